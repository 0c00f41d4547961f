"""The state store in Redis, shared by every replica of the worker.

Every step is one Lua script (`scripts/`), run atomically by Redis: one call per consume
burst (`intake`), one per e-mail (`begin_sending`), one per settled set (`finish`). Times
come from the Redis server's clock, so replicas agree on windows, pace and circuit.

Keys are `<key_prefix>:{<account>}:<kind>[:<id>]`; the `{account}` hash tag puts all of an
account's keys in one slot, so the scripts work on Redis Cluster too:

| key | holds | TTL |
|---|---|---|
| `entry:<request id>` | hash: state, fp, owner, mail, event, at | `dedup_ttl_s` after each change |
| `mail:<mail id>` | hash: record (`MailRecord.dumps()`), unknown | reply timeout + 1 h |
| `taken:<mail id>` | the replica handling its reply | a lease of 120 s |
| `replied:<mail id>` | its reply was applied | `dedup_ttl_s` |
| `unanswered` | sorted set of mail ids by `submitted_at` | reply timeout + 1 h |
| `window:<content key>` | sorted set of admission times | `identical_window_s` |
| `streak:<subscriber>` | hash: last, n | `subscriber_gap_s` |
| `pace:mails`, `pace:parts` | GCRA theoretical arrival time | at most 2 s |
| `pace:mails:high`, `pace:parts:high` | the same, the high lane's share of the rate | 2 s |
| `split:<root mail id>` | hash: failed, ok, mails (a bad-line search) | `dedup_ttl_s` |
| `circuit` | hash: open_until, pause, probe_until, reason | pause + 1 day |
| `stopped` | why the account was stopped | 1 day |
| `owner:<owner>` | this replica is alive | `owner_ttl_s` (heartbeat) |
| `gen` | a random value: gone means Redis lost its data | none |
| `reset` | when the generation was last replaced | `reset_grace_s` |

Redis keeps only what its persistence keeps. When the `gen` key is missing, the data was
lost: the first script to notice creates a new generation and the `reset` mark, and for
`reset_grace_s` a redelivered request with no ledger entry is judged `ledger_lost` (it may
have gone out) instead of `new`.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from worker.accounts import GatewayAccount, accounts_of
from worker.errors import ConfigurationError
from worker.ledger import (
    CircuitView,
    Finish,
    Gate,
    GateKind,
    Intake,
    MailBusy,
    MailRecord,
    SplitNotes,
    StateUnavailable,
    Verdict,
    VerdictKind,
    high_rate_share,
    pace_depth,
)
from worker.settings import DEFAULT_ACCOUNT, Settings

log = logging.getLogger(__name__)

# A record outlives its reply timeout by this much, so a late reply still finds it.
RECORD_MARGIN_S = 3600.0
# A reply being handled holds its e-mail's record this long at most: a replica that died
# while handling one leaves it to be taken again.
TAKE_LEASE_S = 120.0
# The circuit and the account-stopped flag live this long past their last change.
CIRCUIT_KEEP_S = 86400.0
STOPPED_TTL_S = 86400.0
SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://", "rediss+cluster://")
_SCRIPTS = (
    "hello",
    "intake",
    "begin",
    "finish",
    "take",
    "give_back",
    "mark_unknown",
    "unanswered",
    "open_circuit",
    "circuit",
    "split",
)


def _script_text(name: str) -> str:
    scripts = importlib.resources.files("worker.ledger").joinpath("scripts")
    prelude = scripts.joinpath("_prelude.lua").read_text(encoding="utf-8")
    return prelude + scripts.joinpath(f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """`redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`; the
    password is the master's; `?sentinel_password=` authenticates to the sentinels."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for host in hosts.split(","):
        if not host:
            continue
        if host.startswith("["):  # [IPv6]:port
            name, _, port = host[1:].partition("]")
            port = port.removeprefix(":")
        else:
            name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
        try:
            sentinels.append((name, int(port) if port else 26379))
        except ValueError:
            raise ConfigurationError("state.url: a sentinel's port is not a number") from None
    parts = [unquote(p) for p in path.split("/") if p]
    if not sentinels or not parts or len(parts) > 2:
        raise ConfigurationError(
            "state.url: expected redis+sentinel://[:password@]host:port[,host:port...]"
            "/service_name[/db]"
        )
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ConfigurationError("state.url: the database is not a number") from None
    sentinel_password = parse_qs(query).get("sentinel_password", [None])[-1]
    return SentinelTarget(tuple(sentinels), parts[0], db, username, password, sentinel_password)


def describe(url: str) -> str:
    """The URL without its credentials or query, to name the server in messages."""
    scheme, _, rest = url.partition("://")
    rest = rest.partition("?")[0]
    netloc, slash, path = rest.partition("/")
    hosts = netloc.rpartition("@")[2]
    return f"{scheme}://{hosts}{slash}{path}"


def connect(url: str, timeout: float) -> Redis | RedisCluster:
    """A client for the URL (no I/O yet). Commands are not retried by the client: the
    scripts are not idempotent, and the caller decides what to do when Redis is away."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    try:
        if url.startswith(("redis://", "rediss://")):
            return Redis.from_url(url, **options)
        if url.startswith(("redis+cluster://", "rediss+cluster://")):
            scheme, rest = url.split("://", 1)
            plain = "rediss" if scheme.startswith("rediss") else "redis"
            return RedisCluster.from_url(f"{plain}://{rest}", **options)
        if url.startswith("redis+sentinel://"):
            target = parse_sentinel_url(url)
            sentinel_options = {k: v for k, v in options.items() if k != "decode_responses"}
            if target.sentinel_password is not None:
                sentinel_options["password"] = target.sentinel_password
            sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                list(target.sentinels), sentinel_kwargs=sentinel_options
            )
            client: Redis = sentinel.master_for(
                target.service,
                db=target.db,
                username=target.username,
                password=target.password,
                **options,
            )
            return client
    except ConfigurationError:
        raise
    except (ValueError, TypeError, RedisError) as exc:
        # Name the problem only: redis-py's messages do not carry the URL, but say nothing
        # of its contents to be sure.
        raise ConfigurationError(
            f"state.url: not a usable Redis URL ({type(exc).__name__})"
        ) from None
    raise ConfigurationError(f"state.url: the scheme must be one of {', '.join(SCHEMES)}")


class RedisStateStore:
    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] | None = None,
        *,
        account: GatewayAccount | None = None,
    ) -> None:
        """The store of one account (the default one unless `account` says otherwise): its
        keys carry the account's tag, its pace is the account's."""
        account = account or accounts_of(settings)[DEFAULT_ACCOUNT]
        state = settings.state
        url = state.url.get_secret_value()
        if not url:
            raise ConfigurationError("state.url is empty: use the in-memory store")
        if "{" in state.key_prefix or "}" in state.key_prefix:
            raise ConfigurationError("state.key_prefix must not contain '{' or '}'")
        self.owner = uuid.uuid4().hex
        self._target = describe(url)
        self._secrets = [s for s in _url_secrets(url) if s]
        self._limits = account.limits
        self._retry = settings.retry
        self._owner_ttl_ms = _ms(state.owner_ttl_s)
        self._busy_wait = max(state.owner_ttl_s / 3, 0.1)
        self._grace_ms = round(state.reset_grace_s * 1000)
        self._dedup_ms = _ms(account.limits.dedup_ttl_s)
        self._record_ms = _ms(settings.reply.timeout_s + RECORD_MARGIN_S)
        self._deadline = 2 * state.timeout_s
        self._clock = clock
        self._base = f"{state.key_prefix}:{{{account.tag}}}:"
        self._gen_keys = [self._key("gen"), self._key("reset")]
        self._gen: str | None = None
        self._redis = connect(url, state.timeout_s)
        self._scripts = {name: self._redis.register_script(_script_text(name)) for name in _SCRIPTS}

    def _key(self, kind: str, id_: str | None = None) -> str:
        return f"{self._base}{kind}" if id_ is None else f"{self._base}{kind}:{id_}"

    # -- plumbing ---------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StateUnavailable:
        detail = str(exc) or type(exc).__name__
        for secret in self._secrets:
            detail = detail.replace(secret, "**********")
        return StateUnavailable(f"Redis at {self._target} unavailable: {detail}")

    async def _call(self, name: str, *args: str | int | float) -> Any:
        script: AsyncScript = self._scripts[name]
        now = "" if self._clock is None else repr(self._clock())
        head: list[str | int] = [self._base, self._gen or "", uuid.uuid4().hex, self._grace_ms, now]
        try:
            async with asyncio.timeout(self._deadline):
                reply = await script(keys=self._gen_keys, args=[*head, *args])
        except (RedisError, OSError) as exc:  # builtin TimeoutError included
            raise self._unavailable(exc) from None
        gen, seen, result = reply
        self._saw_generation(str(gen), str(seen))
        return result

    async def _command(self, name: str, *args: str | int) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                return await self._redis.execute_command(name, *args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    def _saw_generation(self, gen: str, seen: str) -> None:
        previous = self._gen
        self._gen = gen
        if seen == "new":
            if previous is None:
                log.info("no generation under %s yet (a new account): started %s", self._base, gen)
            else:
                log.warning(
                    "Redis lost its data: generation %s under %s is gone, started %s. Claims "
                    "made before are lost; for %s s a redelivered request with no ledger "
                    "entry is reported ledger_lost instead of sent",
                    previous,
                    self._base,
                    gen,
                    self._grace_ms / 1000,
                )
        elif seen == "changed" and previous is not None:
            log.warning(
                "Redis lost its data: generation %s under %s was replaced by %s (found by "
                "another replica); claims made before are lost",
                previous,
                self._base,
                gen,
            )

    # -- liveness ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._call("hello", self.owner, self._owner_ttl_ms)

    async def heartbeat(self) -> None:
        await self._call("hello", self.owner, self._owner_ttl_ms)

    async def close(self) -> None:
        try:
            # Gone on purpose: its claims lapse now rather than after owner_ttl_s.
            await self._command("DEL", self._key("owner", self.owner))
        except StateUnavailable:
            pass
        finally:
            await self._redis.aclose()

    # -- the ledger -------------------------------------------------------------------

    async def intake(self, items: Sequence[Intake]) -> list[Verdict]:
        if not items:
            return []
        limits = self._limits
        args: list[str | int | float] = [
            self.owner,
            self._dedup_ms,
            limits.identical_per_window,
            repr(limits.identical_window_s),
            limits.subscriber_streak,
            repr(limits.subscriber_gap_s),
            repr(self._busy_wait),
            _json(
                [
                    [
                        item.request_id,
                        item.fingerprint,
                        item.content_key,
                        item.redelivered,
                        list(item.subscribers),
                    ]
                    for item in items
                ]
            ),
        ]
        flat = await self._call("intake", *args)
        return [
            Verdict(
                VerdictKind(flat[i]),
                wait=float(flat[i + 1]),
                reason=flat[i + 2],
                mail_id=flat[i + 3],
                event=flat[i + 4],
            )
            for i in range(0, len(flat), 5)
        ]

    async def begin_sending(self, record: MailRecord) -> Gate:
        limits = self._limits
        ids = [r.request_id for r in record.requests]
        kind, wait, reason, lost, probe = await self._call(
            "begin",
            self.owner,
            record.mail_id,
            record.dumps(),
            repr(record.submitted_at),
            self._record_ms,
            self._dedup_ms,
            repr(limits.mails_per_second),
            repr(limits.parts_per_second),
            repr(float(record.sms_parts)),
            repr(pace_depth(limits, record.urgent)),
            repr(high_rate_share(limits)) if record.urgent else "",
            _json(ids),
        )
        return Gate(GateKind(kind), float(wait), reason, lost=tuple(lost), probe=probe == "1")

    async def finish(self, finish: Finish) -> None:
        steps = {
            "sent": [
                [rid, mail_id, event, fp] for rid, (mail_id, event, fp) in finish.sent.items()
            ],
            "answered": [[rid, event, fp] for rid, (event, fp) in finish.answered.items()],
            "released": list(finish.released),
            "refunds": [[r.content_key, list(r.subscribers)] for r in finish.refunds],
            "mails_done": list(finish.mails_done),
            "replied": list(finish.replied),
        }
        await self._call("finish", self._dedup_ms, _json(steps))

    # -- mail records -----------------------------------------------------------------

    async def take_mail(self, mail_id: str) -> MailRecord | None:
        found = await self._call("take", self.owner, _ms(TAKE_LEASE_S), mail_id)
        if found == "busy":
            raise MailBusy(f"the reply to e-mail {mail_id} is being handled by another replica")
        return _record(found)

    async def knows_mail(self, mail_id: str) -> bool:
        return bool(await self._command("EXISTS", self._key("mail", mail_id)))

    async def give_back_mail(self, mail_id: str) -> None:
        await self._call("give_back", self.owner, mail_id)

    async def mail_replied(self, mail_id: str) -> bool:
        return bool(await self._command("EXISTS", self._key("replied", mail_id)))

    async def mark_unknown(self, mail_id: str) -> MailRecord | None:
        return _record(await self._call("mark_unknown", mail_id))

    async def unanswered(self, older_than: float) -> list[str]:
        return list(await self._call("unanswered", repr(older_than)))

    async def note_split(
        self, root: str, *, failed: bool, allowance: int, ttl: float
    ) -> SplitNotes:
        outcome = "failed" if failed else "ok"
        found = await self._call("split", root, outcome, allowance, _ms(ttl))
        return SplitNotes(int(found[0]), int(found[1]), bool(found[2]))

    # -- the account ------------------------------------------------------------------

    async def open_circuit(self, reason: str, pause: float | None) -> float:
        chosen = await self._call(
            "open_circuit",
            repr(self._retry.circuit_base_s),
            repr(self._retry.circuit_max_s),
            "" if pause is None else repr(pause),
            reason,
            repr(CIRCUIT_KEEP_S),
        )
        return float(chosen)

    async def close_circuit(self) -> None:
        await self._command("DEL", self._key("circuit"))

    async def circuit(self) -> CircuitView:
        return CircuitView(await self._call("circuit"))

    async def stop_account(self, reason: str) -> None:
        await self._command("SET", self._key("stopped"), reason, "PX", _ms(STOPPED_TTL_S))

    async def account_stopped(self) -> str | None:
        reason = await self._command("GET", self._key("stopped"))
        return None if reason is None else str(reason)


def _json(value: Any) -> str:
    """A burst's items as one script argument: redis-py's asyncio client packs every
    argument in Python, and a burst has thousands; Redis decodes this with cjson."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _record(found: Any) -> MailRecord | None:
    if not found:
        return None
    raw, unknown = found
    record = MailRecord.loads(raw)
    return replace(record, outcome_unknown=True) if unknown == "1" else record


def _url_secrets(url: str) -> list[str]:
    """Every secret a URL can carry, raw and unquoted, to be masked in messages."""
    secrets: list[str] = []
    netloc = url.partition("://")[2].partition("/")[0].partition("?")[0]
    userinfo = netloc.rpartition("@")[0]
    if userinfo:
        secret = userinfo.partition(":")[2]
        secrets += [secret, unquote(secret)]
    for name, values in parse_qs(urlsplit(url).query).items():
        if "password" in name:
            secrets += values
    return secrets


__all__ = ["RedisStateStore", "connect", "describe", "parse_sentinel_url"]
