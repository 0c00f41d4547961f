"""The Redis state store behind a Sentinel and on a Redis Cluster, with real servers.

Sentinel: a sentinel started for the test monitors the shared server on 127.0.0.1:6379 (one
sentinel, quorum 1, no replicas: it only watches; no failover is ever asked for), and the
store finds the master through it. The monitor is removed before the sentinel is stopped,
and every key under the test's prefix is deleted afterwards.

Cluster: three empty masters started for the test in their own directories, joined with
`redis-cli --cluster create`, and shut down afterwards, whatever the outcome."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from tests.test_state_store import LIMITS, REDIS_URL, claim, delete_prefix, item, record
from worker.ledger import Finish, GateKind, StateUnavailable, VerdictKind
from worker.ledger.redis import RedisStateStore
from worker.settings import GatewaySettings, LimitSettings, Settings, StateSettings

pytestmark = pytest.mark.timeout(60)

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
START_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def _needs_redis_server() -> None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli are not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cli(port: int, *args: str, timeout: float = 5.0) -> str:
    assert REDIS_CLI is not None
    done = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout


def _wait_for(
    what: str, ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            if ready():
                return
        except (subprocess.TimeoutExpired, OSError):
            pass
        time.sleep(0.05)
    pytest.fail(f"{what} not ready within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    assert REDIS_SERVER is not None
    with log.open("wb") as out:
        return subprocess.Popen([REDIS_SERVER, *args], stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _settings(url: str, prefix: str, login: str = "") -> Settings:
    return Settings(
        gateway=GatewaySettings(login=login),
        state=StateSettings(url=SecretStr(url), key_prefix=prefix),
        limits=LimitSettings(**LIMITS),
    )


async def _exercise(store: RedisStateStore) -> None:
    """Every script once: claims, a mail begun and settled, its record taken, a replay."""
    await store.start()
    await claim(store, "r1", "r2")
    sent = record("m1", "r1")
    assert (await store.begin_sending(sent)).kind == GateKind.go
    await store.finish(Finish(sent={"r1": ("m1", '{"event": 1}', "fp")}, released=["r2"]))
    assert await store.take_mail("m1") == sent
    await store.give_back_mail("m1")
    again = await store.intake([item("r1"), item("r2")])
    assert [v.kind for v in again] == [VerdictKind.replay, VerdictKind.new]
    assert (again[0].mail_id, again[0].event) == ("m1", '{"event": 1}')
    assert await store.unanswered(time.time() + 3600) == ["m1"]
    assert await store.open_circuit("blocked", 5.0) == pytest.approx(5.0)
    await store.close_circuit()
    await store.stop_account("stopped")
    assert await store.account_stopped() == "stopped"
    await store.heartbeat()


def _kinds(keys: list[str], prefix: str, account: str) -> set[str]:
    head = f"{prefix}:{{{account}}}:"
    assert all(k.startswith(head) for k in keys), keys
    return {k.removeprefix(head).split(":")[0] for k in keys}


EXPECTED_KINDS = {"gen", "owner", "entry", "mail", "unanswered", "window", "pace", "stopped"}


# -- Sentinel ---------------------------------------------------------------------------


@dataclass
class SentinelRun:
    port: int
    name: str


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelRun]:
    port = _free_port()
    name = f"smsc-test-{uuid.uuid4().hex[:12]}"
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {tmp_path}\n"
        "daemonize no\n"
        f"sentinel monitor {name} 127.0.0.1 6379 1\n"
        # Longer than the test: the shared server is never judged down while it runs.
        f"sentinel down-after-milliseconds {name} 600000\n"
        f"sentinel failover-timeout {name} 600000\n"
    )
    log = tmp_path / "sentinel.log"
    process = _start([str(conf), "--sentinel"], log)
    try:

        def ready() -> bool:
            addr = _cli(port, "SENTINEL", "get-master-addr-by-name", name).split()
            return addr == ["127.0.0.1", "6379"]

        _wait_for("sentinel", ready, process, log)
        yield SentinelRun(port, name)
    finally:
        if process.poll() is None:
            _cli(port, "SENTINEL", "REMOVE", name)
        _stop(process)


async def test_the_store_finds_its_master_through_a_sentinel(sentinel: SentinelRun) -> None:
    prefix = f"test-sentinel-{uuid.uuid4().hex[:12]}"
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{sentinel.name}"
    store = RedisStateStore(_settings(url, prefix))
    try:
        try:
            await _exercise(store)
        finally:
            await store.close()
        direct = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            keys = list(direct.scan_iter(match=f"{prefix}:*", count=1000))
        finally:
            direct.close()
        # Everything landed on the master the sentinel named; `close` dropped the owner key.
        assert _kinds(keys, prefix, "default") >= EXPECTED_KINDS - {"owner"}
    finally:
        await delete_prefix(prefix)

    # The master is the sentinel's answer: a service it does not monitor is no Redis at all.
    unknown = RedisStateStore(_settings(f"{url}-unknown", prefix))
    try:
        with pytest.raises(StateUnavailable, match="No master found"):
            await unknown.start()
    finally:
        await unknown.close()


# -- Cluster ----------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for n in range(3):
            port, bus = _free_port(), _free_port()
            home = tmp_path / f"node{n}"
            home.mkdir()
            log = home / "redis.log"
            process = _start(
                [
                    *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(home)),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-port", str(bus), "--save", "", "--appendonly", "no"),
                    *("--daemonize", "no"),
                ],
                log,
            )
            processes.append(process)
            ports.append(port)
            _wait_for(
                f"node {port}", lambda p=port: _cli(p, "PING").strip() == "PONG", process, log
            )
        created = subprocess.run(
            [
                str(REDIS_CLI),
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                *("--cluster-replicas", "0", "--cluster-yes"),
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        for port, process in zip(ports, processes, strict=True):
            _wait_for(
                f"cluster state on {port}",
                lambda p=port: "cluster_state:ok" in _cli(p, "CLUSTER", "INFO"),
                process,
                tmp_path / f"node{ports.index(port)}" / "redis.log",
            )
        yield ports
    finally:
        for process in processes:
            _stop(process)


def _cluster_keys(ports: list[int], prefix: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for port in ports:
        node = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            found[port] = list(node.scan_iter(match=f"{prefix}:*", count=1000))
        finally:
            node.close()
    return found


async def test_the_store_runs_on_a_cluster_one_slot_per_account(cluster: list[int]) -> None:
    prefix = f"test-cluster-{uuid.uuid4().hex[:12]}"
    url = f"redis+cluster://127.0.0.1:{cluster[0]}"
    # Their hash tags fall in slots 11304 and 5538: on two of the three masters.
    accounts = ("acme", "umbrella")
    for account in accounts:
        store = RedisStateStore(_settings(url, prefix, login=account))
        try:
            await _exercise(store)
        finally:
            await store.close()

    by_node = _cluster_keys(cluster, prefix)
    slots: dict[str, set[int]] = {}
    nodes: dict[str, set[int]] = {}
    for port, keys in by_node.items():
        for key in keys:
            account = key.split("{", 1)[1].split("}", 1)[0]
            slot = int(_cli(cluster[0], "CLUSTER", "KEYSLOT", key).strip())
            slots.setdefault(account, set()).add(slot)
            nodes.setdefault(account, set()).add(port)
    assert set(slots) == set(accounts)
    for account in accounts:
        keys = [k for ks in by_node.values() for k in ks if f"{{{account}}}" in k]
        assert _kinds(keys, prefix, account) >= EXPECTED_KINDS - {"owner"}
        assert len(slots[account]) == 1, slots  # every key of an account in one slot
        assert len(nodes[account]) == 1, nodes
    assert slots["acme"] != slots["umbrella"]
    assert nodes["acme"] != nodes["umbrella"]  # and here on different masters
