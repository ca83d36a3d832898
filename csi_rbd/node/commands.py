"""Running the node's external tools: argv lists, timeouts, never a shell."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from csi_rbd.node.errors import DataPathError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


class CommandFailed(DataPathError):
    """A tool exited non-zero (or timed out); ``stderr`` holds what it said."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        what = "timed out" if returncode is None else f"exited {returncode}"
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("dmesg(1) may have")]
        detail = " / ".join(lines)[:600] or "no output"
        super().__init__(f"{' '.join(argv)} {what}: {detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with no standard input; CommandFailed when it fails and ``check``."""
    log.debug("running %s", argv)
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise CommandFailed(argv, None, stderr) from exc
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]}: not installed") from exc
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stderr or result.stdout)
    return result
