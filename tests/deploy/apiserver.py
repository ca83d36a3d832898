"""A real kube-apiserver, with etcd, for the deployment tests: build or reuse, start, stop.

No registry serves a current kube-apiserver, so it is built from Debian's
``kubernetes`` source package (1.20.2 in bookworm) with Debian's Go
(``golang-go``) the way Debian's own packaging builds it (``make
WHAT=cmd/kube-apiserver``, ~7-13 minutes on two cores; with its vendored
reflect2 replaced by Debian's fixed one, see REFLECT2), once: the binary is
kept in ``<cache>/kube-apiserver/`` (``/var/cache/csi-rbd-test`` or
``$CSI_RBD_TEST_CACHE``) and every later run reuses it. etcd is Debian's
``etcd-server``. The source comes from the Debian archive the machine's apt
already uses (``apt-get source``, with a private deb-src list, so the
system's apt configuration is untouched); run ``python -m
tests.deploy.apiserver build`` at setup time so that tests never fetch it.

:func:`start` runs etcd and kube-apiserver on 127.0.0.1 (free ports) in a
throwaway directory: a fresh CA and serving certificate (openssl), a
service-account signing key, a static token file (an admin in
system:masters plus any users the caller names, e.g. a service account's
identity for RBAC checks), RBAC authorization. :meth:`Cluster.stop` ends
both processes.

Knobs: ``CSI_RBD_APISERVER=skip`` skips (tests say so); ``=no-build`` uses a
cached binary only.

    python -m tests.deploy.apiserver build    # build (or find) the binary
    python -m tests.deploy.apiserver run      # start one; print its kubeconfig
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.deploy.tools import cache_dir

SOURCE_PACKAGE = "kubernetes"
BUILD_TIMEOUT = 45 * 60
# Kubernetes 1.20 vendors github.com/modern-go/reflect2 1.0.1, whose map
# iteration reads Go runtime internals that changed in Go 1.18: built with
# bookworm's Go 1.19, kube-apiserver dies (SIGSEGV in mapiternext) on the
# first custom resource it decodes. reflect2 1.0.2 fixed that; Debian ships
# it (golang-github-modern-go-reflect2-dev), so the build swaps it in. The
# recipe is stamped beside the binary: a binary built another way is rebuilt.
REFLECT2 = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
RECIPE = "make WHAT=cmd/kube-apiserver; vendor reflect2 from Debian (>= 1.0.2)"
Log = Callable[[str], None]


class Unavailable(Exception):
    """A real API server cannot be had here; the message says exactly why."""


def _stderr(message: str) -> None:
    print(f"[apiserver] {message}", file=sys.stderr, flush=True)


def _home() -> Path:
    path = cache_dir() / "kube-apiserver"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_binary() -> Path:
    return _home() / "bin" / "kube-apiserver"


def _recipe_file(binary: Path) -> Path:
    return binary.with_name(binary.name + ".recipe")


def _cached(binary: Path) -> str | None:
    """The cached binary's version if it runs and was built by this recipe."""
    recipe = _recipe_file(binary)
    if not recipe.is_file() or recipe.read_text().strip() != RECIPE:
        return None
    return _works(binary)


def _works(binary: Path) -> str | None:
    """The binary's version line, or None if it does not run."""
    if not binary.is_file():
        return None
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _which(name: str, *extra: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in extra if os.access(p, os.X_OK)), None)


# --- the Debian source ---------------------------------------------------------------------


def _deb_src_lists(private: Path) -> None:
    """deb-src twins of the system's deb sources, in a private apt directory."""
    parts = private / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for old in parts.iterdir():
        old.unlink()
    one_line: list[str] = []
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip().startswith("deb "):
                    one_line.append("deb-src " + line.strip()[4:])
    (private / "sources.list").write_text("\n".join(one_line) + "\n")
    for index, path in enumerate(sorted((apt / "sources.list.d").glob("*.sources"))):
        stanzas = []
        for block in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
            if "deb" not in fields.get("Types", "").split():
                continue
            if fields.get("Enabled", "yes").lower() == "no":
                continue
            fields["Types"] = "deb-src"
            stanzas.append("\n".join(f"{k}: {v}" for k, v in fields.items()))
        if stanzas:
            (parts / f"{index:02d}-src.sources").write_text("\n\n".join(stanzas) + "\n")


def _source_tree(log: Log) -> Path:
    """The unpacked ``kubernetes`` source package (fetched with apt-get source if absent)."""
    src = _home() / "src"
    src.mkdir(exist_ok=True)
    trees = sorted(p for p in src.glob(f"{SOURCE_PACKAGE}-*") if (p / "Makefile").is_file())
    if trees:
        return trees[-1]
    if not _which("dpkg-source"):
        raise Unavailable(
            "cannot unpack Debian's kubernetes source package: dpkg-source is missing "
            "(Debian package dpkg-dev)"
        )
    private = _home() / "apt"
    (private / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    _deb_src_lists(private)
    options = [
        f"-oDir::Etc::SourceList={private / 'sources.list'}",
        f"-oDir::Etc::SourceParts={private / 'parts'}",
        f"-oDir::State::Lists={private / 'lists'}",
        "-oAPT::Sandbox::User=root",
        "-qq",
    ]
    log("fetching Debian's kubernetes source package (apt-get source)")
    for argv, where in (
        (["apt-get", *options, "update"], None),
        (["apt-get", *options, "source", SOURCE_PACKAGE], src),
    ):
        result = subprocess.run(
            argv, cwd=where, capture_output=True, text=True, timeout=1200, check=False
        )
        if result.returncode != 0:
            raise Unavailable(
                f"{' '.join(argv[:1] + argv[-2:])} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-800:]}"
            )
    trees = sorted(p for p in src.glob(f"{SOURCE_PACKAGE}-*") if (p / "Makefile").is_file())
    if not trees:
        raise Unavailable(f"apt-get source {SOURCE_PACKAGE} left no source tree in {src}")
    return trees[-1]


def _patch_reflect2(tree: Path) -> None:
    """Put Debian's reflect2 (>= 1.0.2) in place of the vendored 1.0.1 (see REFLECT2)."""
    if not (REFLECT2 / "go_above_118.go").is_file():
        raise Unavailable(
            "cannot build a working kube-apiserver 1.20 with Go >= 1.18: its vendored reflect2 "
            "1.0.1 crashes; install Debian's fixed one (golang-github-modern-go-reflect2-dev)"
        )
    vendored = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    for old in vendored.iterdir():
        if old.suffix in (".go", ".s"):
            old.unlink()
    for new in REFLECT2.iterdir():
        if new.suffix in (".go", ".s") and not new.name.endswith("_test.go"):
            shutil.copy2(new, vendored / new.name)


def build(log: Log = _stderr) -> Path:
    """The cached kube-apiserver binary, built from Debian's source first if needed."""
    binary = cached_binary()
    if _cached(binary):
        return binary
    if os.environ.get("CSI_RBD_APISERVER") == "no-build":
        raise Unavailable(f"no kube-apiserver at {binary} and CSI_RBD_APISERVER=no-build")
    with _locked(_home() / ".build.lock"):
        if _cached(binary):  # another process built it while we waited
            return binary
        missing = [
            f"{tool} (Debian package {package})"
            for tool, package, fallback in (
                ("go", "golang-go", "/usr/lib/go/bin/go"),
                ("make", "make", "/usr/bin/make"),
                ("rsync", "rsync", "/usr/bin/rsync"),
            )
            if not _which(tool, fallback)
        ]
        if missing:
            raise Unavailable(
                "cannot build kube-apiserver from Debian's kubernetes source: missing "
                + ", ".join(missing)
            )
        tree = _source_tree(log)
        _patch_reflect2(tree)
        log(f"building kube-apiserver in {tree} (make WHAT=cmd/kube-apiserver; ~7-13 min)")
        started = time.monotonic()
        build_log = _home() / "build.log"
        env = {
            **os.environ,
            "HOME": str(_home()),
            "GOFLAGS": "",
            "GO111MODULE": "off",
            "PATH": f"/usr/lib/go/bin:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        with open(build_log, "w") as output:
            try:
                result = subprocess.run(
                    ["make", "WHAT=cmd/kube-apiserver"],
                    cwd=tree,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    timeout=BUILD_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise Unavailable(
                    f"building kube-apiserver took over {BUILD_TIMEOUT}s (log: {build_log})"
                ) from exc
        built = tree / "_output" / "bin" / "kube-apiserver"
        if result.returncode != 0 or not built.is_file():
            tail = build_log.read_text()[-1500:]
            raise Unavailable(
                f"building kube-apiserver failed ({result.returncode}); log {build_log}:\n{tail}"
            )
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(binary)
        _recipe_file(binary).write_text(RECIPE + "\n")
        # The build's own GOPATH and caches are large; the binary is what is kept.
        shutil.rmtree(tree / "_output", ignore_errors=True)
        log(f"built {binary} in {time.monotonic() - started:.0f}s: {_works(binary)}")
        (_home() / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
        return binary


# --- running it ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def _certificates(pki: Path) -> None:
    """A throwaway CA, a serving certificate for 127.0.0.1, a service-account key."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-days", "2", "-subj", "/CN=csi-rbd-test-ca",
        "-out", "ca.crt", cwd=pki,
    )  # fmt: skip
    _openssl("genrsa", "-out", "server.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", "server.key", "-subj", "/CN=kube-apiserver",
             "-out", "server.csr", cwd=pki)  # fmt: skip
    (pki / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=pki,
    )  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


@dataclass
class Cluster:
    """A running etcd + kube-apiserver; ``stop()`` ends both."""

    url: str
    ca_file: Path
    workdir: Path
    tokens: dict[str, str]  # user name -> bearer token
    version: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def admin_token(self) -> str:
        return self.tokens["admin"]

    def kubeconfig(self, user: str = "admin") -> Path:
        """A kubeconfig file for one of the token users."""
        path = self.workdir / f"kubeconfig-{re.sub(r'[^A-Za-z0-9_.-]', '_', user)}"
        if not path.exists():
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                    }
                ],
                "users": [{"name": "user", "user": {"token": self.tokens[user]}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
                "current-context": "test",
            }
            path.write_text(yaml.safe_dump(config))
            path.chmod(0o600)
        return path

    def request(
        self,
        path: str,
        user: str = "admin",
        timeout: float = 10,
        method: str = "GET",
        body: object = None,
        content_type: str = "application/json",
    ) -> tuple[int, str]:
        """One raw API call as a token user: (HTTP status, body text)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.tokens[user]}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, context=context, timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")

    def call(
        self, method: str, path: str, body: object = None, user: str = "admin"
    ) -> dict[str, object]:
        """An API call that must succeed; its JSON answer."""
        status, text = self.request(path, user=user, method=method, body=body)
        if status >= 300:
            raise AssertionError(f"{method} {path} as {user}: {status} {text[:1000]}")
        answer = json.loads(text) if text else {}
        return answer if isinstance(answer, dict) else {"items": answer}

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()


def _wait(
    what: str, check: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, limit: float
) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{what} not ready after {limit:.0f}s:\n{tail}")


def start(
    workdir: Path | None = None,
    users: Mapping[str, Sequence[str]] | None = None,
    binary: Path | None = None,
    log: Log = _stderr,
) -> Cluster:
    """Start etcd and kube-apiserver on 127.0.0.1; ``users`` maps extra user names to groups."""
    if os.environ.get("CSI_RBD_APISERVER") == "skip":
        raise Unavailable("disabled by CSI_RBD_APISERVER=skip")
    etcd = _which("etcd", "/usr/bin/etcd")
    if etcd is None:
        raise Unavailable("etcd is not installed (Debian package etcd-server)")
    if _which("openssl") is None:
        raise Unavailable("openssl is not installed (Debian package openssl)")
    apiserver = binary or build(log)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="csi-rbd-apiserver-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    _certificates(pki)
    tokens = {"admin": secrets.token_hex(16), "nobody": secrets.token_hex(16)}
    groups: dict[str, Sequence[str]] = {"admin": ["system:masters"], "nobody": []}
    for name, member_of in (users or {}).items():
        tokens[name] = secrets.token_hex(16)
        groups[name] = member_of
    with open(workdir / "tokens.csv", "w") as handle:
        for index, (name, token) in enumerate(tokens.items()):
            group_field = ",".join(groups[name])
            handle.write(f'{token},{name},uid-{index},"{group_field}"\n')

    client_port, peer_port, secure_port = _free_port(), _free_port(), _free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    cluster = Cluster(
        url=f"https://127.0.0.1:{secure_port}",
        ca_file=pki / "ca.crt",
        workdir=workdir,
        tokens=tokens,
    )
    try:
        etcd_log = workdir / "etcd.log"
        with open(etcd_log, "wb") as output:
            etcd_process = subprocess.Popen(
                [
                    etcd,
                    "--name=test",
                    f"--data-dir={workdir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        cluster.processes.append(etcd_process)

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(f"{etcd_url}/health", timeout=2) as response:
                return bool(json.loads(response.read()).get("health") == "true")

        _wait("etcd", etcd_healthy, etcd_process, etcd_log, 60)

        apiserver_log = workdir / "kube-apiserver.log"
        with open(apiserver_log, "wb") as output:
            process = subprocess.Popen(
                [
                    str(apiserver),
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={secure_port}",
                    "--insecure-port=0",
                    f"--tls-cert-file={pki / 'server.crt'}",
                    f"--tls-private-key-file={pki / 'server.key'}",
                    f"--token-auth-file={workdir / 'tokens.csv'}",
                    "--authorization-mode=RBAC",
                    "--allow-privileged=true",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    f"--cert-dir={workdir / 'certs'}",
                    "--enable-priority-and-fairness=false",
                    "--profiling=false",
                    "--v=1",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        cluster.processes.append(process)
        _wait(
            "kube-apiserver",
            lambda: cluster.request("/readyz")[0] == 200,
            process,
            apiserver_log,
            180,
        )
        status, body = cluster.request("/version")
        cluster.version = str(json.loads(body).get("gitVersion", "")) if status == 200 else ""
        log(f"kube-apiserver {cluster.version} ready at {cluster.url} (dir {workdir})")
        return cluster
    except BaseException:
        cluster.stop()
        raise


def main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "build"
    try:
        if command == "build":
            binary = build()
            print(f"{binary}: {_cached(binary)}")
            return 0
        if command == "run":
            cluster = start()
            print(f"kubeconfig: {cluster.kubeconfig()}  (Ctrl-C stops)")
            try:
                while all(p.poll() is None for p in cluster.processes):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            finally:
                cluster.stop()
            return 0
    except Unavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 1
    print("usage: python -m tests.deploy.apiserver [build|run]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
