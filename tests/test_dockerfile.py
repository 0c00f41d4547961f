"""The Dockerfile: hadolint-clean, and its build replayed without a container engine.

There is no Docker here, so the replay follows the Dockerfile itself: the build context is
the project filtered by .dockerignore, each stage gets a stand-in for its base image (a
Python venv for `python:3.11.*`, the locked uv binary for the uv image), and COPY, ENV,
WORKDIR and RUN are carried out in a scratch directory that stands in for the image's
root. The installed entrypoint then runs as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
DOCKERFILE = PROJECT / "Dockerfile"
DOCKERIGNORE = PROJECT / ".dockerignore"

# The image directories that the replay moves into its scratch root; every other absolute
# path (/bin/sh, /tmp, the uv cache in $HOME) stays the host's.
IMAGE_DIRS = ("/usr/local", "/opt", "/src")
_IMAGE_PATH = re.compile(
    r"(?<![\w.-])(" + "|".join(re.escape(d) for d in IMAGE_DIRS) + r")(?![\w.-])"
)
# The environment that the official python images set.
PYTHON_IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
IMAGE_METADATA = {"USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL", "STOPSIGNAL", "HEALTHCHECK"}
# Host variables that would make the replay use something other than what the image has.
_HOST_ONLY = re.compile(r"^(VIRTUAL_ENV|PYTHONPATH|PYTHONHOME|CONDA_\w+|UV_\w+|SMSC_\w+)$")


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        """The arguments of each of this stage's `keyword` instructions."""
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions, continuation lines joined and comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not logical):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        keyword, _, args = (logical + line).partition(" ")
        logical = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            image, _, name = args.partition(" AS ")
            stages.append(Stage(image.strip(), name.strip() or None))
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker's matcher reads it: `**` spans directories."""
    out = ""
    for token in re.findall(r"\*\*/|\*\*|\*|\?|\[[^\]]*\]|[^*?\[]+", pattern):
        if token == "**/":
            out += "(?:.*/)?"
        elif token == "**":
            out += ".*"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        elif token.startswith("["):
            out += token
        else:
            out += re.escape(token)
    return re.compile(out)


def build_context(project: Path, dockerignore: Path) -> list[Path]:
    """The files `docker build` would send: the last matching pattern decides, and a pattern
    matching a parent directory matches everything under it."""
    rules: list[tuple[bool, re.Pattern[str], str]] = []
    for raw in dockerignore.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((include, _ignore_regex(pattern), pattern))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for include, regex, _ in rules:
            if any(regex.fullmatch(c) for c in candidates):
                verdict = not include
        return verdict

    exceptions = [p for include, _, p in rules if include]
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(project):
        base = Path(dirpath).relative_to(project)
        # Like Docker, skip a whole excluded directory unless an exception could reach into it.
        dirnames[:] = [
            d
            for d in dirnames
            if not excluded((base / d).as_posix())
            or any(p.startswith(f"{(base / d).as_posix()}/") for p in exceptions)
        ]
        files += [base / f for f in filenames if not excluded((base / f).as_posix())]
    return sorted(files)


def _tool(name: str) -> Path:
    """A dev tool from this venv (locked in uv.lock), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = beside if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `uv sync` (it is a dev dependency)")
    return Path(found)


def _locked_version(package: str) -> str:
    lock = tomllib.loads((PROJECT / "uv.lock").read_text())
    return str(next(p["version"] for p in lock["package"] if p["name"] == package))


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_hadolint_reports_nothing_at_warning_or_above() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--format", "json", "--no-fail", DOCKERFILE],
        capture_output=True,
        text=True,
        check=True,
    )
    findings = json.loads(result.stdout)
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious
    )


def test_runtime_stage_is_non_root_exec_form_and_pinned(stages: list[Stage]) -> None:
    final = stages[-1]
    builder = next(s for s in stages if s.name == "builder")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", final.image), final.image
    # The venv copied from the builder links to its interpreter: same image on both sides.
    assert builder.image == final.image
    assert [json.loads(a) for a in final.args("ENTRYPOINT")] == [["smsc-worker"]]
    assert [json.loads(a) for a in final.args("CMD")] == [["run"]]
    (user,) = final.args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "USER must be numeric, for runAsNonRoot to verify it"
    assert int(uid) > 0, "USER must not be root"
    assert not gid or gid.isdigit()
    assert {p for a in final.args("EXPOSE") for p in a.split()} == {"2525", "8080", "9100"}
    env = " ".join(final.args("ENV"))
    assert "PYTHONUNBUFFERED=1" in env
    compilers = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make)\b")
    assert not [r for r in final.args("RUN") if compilers.search(r)]


def test_uv_image_pin_matches_the_locked_uv(stages: list[Stage]) -> None:
    (uv_image,) = [s.image for s in stages if s.image.startswith("ghcr.io/astral-sh/uv:")]
    assert uv_image.partition(":")[2] == _locked_version("uv")


def test_build_context_keeps_out_local_state(tmp_path: Path) -> None:
    for rel in (
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "worker/cli.py",
        "worker/protocol/mail.py",
        "worker/__pycache__/cli.cpython-311.pyc",
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        "tests/test_cli.py",
        "bench/results/run.json",
        "helm/smsc-worker/Chart.yaml",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    assert [p.as_posix() for p in build_context(tmp_path, DOCKERIGNORE)] == [
        "README.md",
        "pyproject.toml",
        "uv.lock",
        "worker/cli.py",
        "worker/protocol/mail.py",
    ]


class Replay:
    """Carries out the Dockerfile's stages in `work`; the current stage's root filesystem
    is always `work/root`, so absolute paths (venv links, script shebangs) stay valid when a
    later stage copies from an earlier one, as they do in Docker."""

    def __init__(self, work: Path, context: Path) -> None:
        self.work = work
        self.context = context
        self.root = work / "root"
        self.finished: dict[str, Path] = {}
        self.env: dict[str, str] = {}
        self.workdir = "/"

    def host(self, container_path: str) -> Path:
        path = os.path.normpath(os.path.join(self.workdir, container_path))
        assert _IMAGE_PATH.match(path) or path == "/", f"{path} is outside {IMAGE_DIRS}"
        return self.root / path.lstrip("/")

    def translate(self, text: str) -> str:
        return _IMAGE_PATH.sub(lambda m: f"{self.root}{m.group(1)}", text)

    def host_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not _HOST_ONLY.match(k)}
        env.update({k: self.translate(v) for k, v in self.env.items()})
        return env

    def run_stages(self, stages: list[Stage]) -> None:
        for index, stage in enumerate(stages):
            self.start(stage.image)
            for instruction in stage.instructions:
                if instruction.keyword in {"ENV", "WORKDIR", "COPY", "RUN"}:
                    getattr(self, f"do_{instruction.keyword.lower()}")(instruction.args)
                else:
                    # Image metadata changes no file; the static test checks it.
                    assert instruction.keyword in IMAGE_METADATA, (
                        f"the replay does not know {instruction.keyword}"
                    )
            if index < len(stages) - 1:
                self.finished[stage.name or str(index)] = self.root.rename(
                    self.work / f"stage-{index}"
                )

    def start(self, image: str) -> None:
        self.root.mkdir()
        self.workdir = "/"
        repository, _, tag = image.partition(":")
        if repository == "python":
            assert tag.startswith(f"{sys.version_info.major}.{sys.version_info.minor}."), (
                f"the replay runs Python {sys.version.split()[0]}, the image has {tag}"
            )
            venv.EnvBuilder(symlinks=True).create(self.root / "usr/local")
            self.env = dict(PYTHON_IMAGE_ENV)
        elif repository == "ghcr.io/astral-sh/uv":
            shutil.copy2(_tool("uv"), self.root / "uv")
            self.env = {}
        else:
            pytest.fail(f"the replay has no stand-in for base image {image}")

    def do_env(self, args: str) -> None:
        for pair in shlex.split(args):
            name, _, value = pair.partition("=")
            self.env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: self.env.get(m.group(1), ""), value)

    def do_workdir(self, args: str) -> None:
        self.workdir = os.path.normpath(os.path.join(self.workdir, args))
        self.host(self.workdir).mkdir(parents=True, exist_ok=True)

    def do_copy(self, args: str) -> None:
        words = shlex.split(args)
        flags = {w.partition("=")[0]: w.partition("=")[2] for w in words if w.startswith("--")}
        *sources, dest = [w for w in words if not w.startswith("--")]
        source_root = self.finished[flags["--from"]] if "--from" in flags else self.context
        target = self.host(dest)
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            origin = source_root / source.lstrip("/")
            assert origin.exists(), f"COPY {source}: not in the build context or stage"
            if origin.is_dir():
                shutil.copytree(origin, target, symlinks=True, dirs_exist_ok=True)
            else:
                destination = target / origin.name if into_dir else target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination)

    def do_run(self, args: str) -> None:
        # Build-time flags such as --mount=type=cache only change caching, not the result.
        command = re.sub(r"^(?:--\S+\s+)*", "", args)
        assert not command.startswith("["), "the replay runs shell-form RUN only"
        result = subprocess.run(
            ["/bin/sh", "-c", self.translate(command)],
            cwd=self.host(self.workdir),
            env=self.host_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def image(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Replay:
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for rel in build_context(PROJECT, DOCKERIGNORE):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, context / rel)
    replay = Replay(work, context)
    replay.run_stages(stages)
    return replay


def _entrypoint(image: Replay, stages: list[Stage], *args: str) -> subprocess.CompletedProcess[str]:
    (entrypoint,) = stages[-1].args("ENTRYPOINT")
    return subprocess.run(
        [*json.loads(entrypoint), *args],
        cwd=image.host(image.workdir),
        env=image.host_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_installed_entrypoint_starts(image: Replay, stages: list[Stage]) -> None:
    (cmd,) = stages[-1].args("CMD")
    # `run --help` proves the default command exists without connecting anywhere.
    for args in (["--help"], [*json.loads(cmd), "--help"]):
        result = _entrypoint(image, stages, *args)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout


def test_installed_entrypoint_prints_config(image: Replay, stages: list[Stage]) -> None:
    result = _entrypoint(image, stages, "config")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["observability"]["health_port"] == 8080


def test_runtime_stage_holds_the_venv_but_not_the_sources(image: Replay) -> None:
    assert (image.root / "opt/venv/bin/smsc-worker").exists()
    # Non-editable install: the package lives in site-packages, compiled ahead of time
    # because the container's root filesystem is read-only.
    assert not (image.root / "src").exists()
    (package,) = (image.root / "opt/venv/lib").glob("python3.*/site-packages/worker")
    assert list(package.glob("__pycache__/cli.*.pyc"))
