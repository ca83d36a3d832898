"""The Dockerfile: hadolint passes it, and it builds what the chart expects.

The image itself cannot be built here (no image registry for the base
image, no container daemon); these tests lint it and read it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.deploy.tools import DOCKERFILE, REPO, find_hadolint, run


@pytest.fixture(scope="module")
def hadolint() -> Path:
    binary, reason = find_hadolint()
    if binary is None:
        pytest.skip(reason)
    return binary


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_passes(hadolint: Path) -> None:
    result = run([hadolint, "--format", "json", "--failure-threshold", "info", DOCKERFILE])
    assert json.loads(result.stdout) == []


def test_hadolint_ignores_are_only_apt_pinning() -> None:
    ignores = re.findall(r"#\s*hadolint ignore=(\S+)", DOCKERFILE.read_text())
    assert ignores and set(ignores) == {"DL3008"}


def test_hadolint_catches_a_bad_dockerfile(hadolint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install python3\nRUN cd /tmp\n")
    result = run([hadolint, "--format", "json", bad], check=False)
    assert result.returncode != 0
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3003"} <= codes  # :latest, cd in RUN


def test_multi_stage_from_bookworm_slim_with_the_data_path_tools() -> None:
    steps = instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in steps if k == "ARG" and "=" in a}
    assert args["DEBIAN_IMAGE"] == "debian:bookworm-slim"
    stages = [a for k, a in steps if k == "FROM"]
    assert stages == ["${DEBIAN_IMAGE} AS builder", "${DEBIAN_IMAGE}"]
    runtime = steps[[k for k, _ in steps].index("FROM", 1) :]  # the second stage
    installs = " ".join(a for k, a in runtime if k == "RUN" and "apt-get install" in a)
    for package in (
        "python3",
        "e2fsprogs",
        "xfsprogs",
        "util-linux",
        "fuse3",
        "qemu-utils",
        "ceph-common",
        "python3-rados",
        "python3-rbd",
    ):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", installs), package
    # the package comes from the wheel the builder made, installed offline
    assert any(k == "COPY" and a.startswith("--from=builder /wheels") for k, a in runtime)
    assert any(
        k == "RUN" and "--no-index --find-links=/tmp/wheels csi-rbd" in a for k, a in runtime
    )
    assert any(k == "RUN" and "pip wheel --wheel-dir /wheels ." in a for k, a in steps)
    assert any(k == "RUN" and "--system-site-packages" in a for k, a in runtime)


def test_runs_csi_rbd_serve_as_a_non_root_user() -> None:
    steps = instructions()
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = json.loads(next(a for k, a in steps if k == "ENTRYPOINT"))
    assert entrypoint[-2:] == ["csi-rbd", "serve"]
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "CSI_RBD_DATA_DIR=/var/lib/csi-rbd" in env  # where the chart mounts the data


def test_build_context_holds_what_the_builder_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    for needed in ("pyproject.toml", "README.md", "csi_rbd/"):
        assert f"!{needed}" in ignore
        assert (REPO / needed.rstrip("/")).exists()
