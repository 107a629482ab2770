"""What every test fixture that starts a real server needs: a free loopback port, a child that dies
with the test process, and a polite-then-firm stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():  # Linux: the child gets SIGTERM if the test process dies without cleaning up
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # best effort: without it, the fixture's own stop() still ends the child


DIE_WITH_PARENT = _die_with_parent if sys.platform == "linux" else None


def stop(proc: subprocess.Popen, timeout: float = 5) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
