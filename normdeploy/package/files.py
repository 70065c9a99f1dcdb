"""File-system helpers of the package stage: temporary directories that end up as output.

``tempfile.mkdtemp`` creates its directory with mode 0700 whatever the umask, so an output
directory renamed from one would be unreadable to a server running as another user. Every
directory normdeploy writes for others goes through :func:`mkdtemp`, which gives it the
mode an ``os.mkdir`` would (0777 less the umask).
"""
from __future__ import annotations

import os
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic set-and-restore (not thread-safe, but brief)
    os.umask(old)
    return old


def mkdtemp(prefix: str, dir: str) -> str:
    """``tempfile.mkdtemp`` whose directory gets the umask's mode instead of 0700."""
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    os.chmod(path, 0o777 & ~current_umask())
    return path
