"""File-system helpers of the package stage: temporary directories that end up as output, and
the ownership rules that keep normdeploy from deleting anything it did not write.

``tempfile.mkdtemp`` creates its directory with mode 0700 whatever the umask, so an output
directory renamed from one would be unreadable to a server running as another user. Every
directory normdeploy writes for others goes through :func:`mkdtemp`, which gives it the
mode an ``os.mkdir`` would (0777 less the umask).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile

from ..core.errors import InputError


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


# ----------------------------------------------------------------------------- ownership (issue 16)
#
# normdeploy replaces or deletes only directories it wrote. Every directory it creates for output
# (the --out directory, each Triton entry, and the hidden scratch directories beside them) carries
# MARKER, a small JSON file naming the writer process (pid, its start time, host). A directory
# without it is the user's: never replaced, never deleted. Scratch directories left by a writer
# that was killed (SIGKILL, power loss) are removed by the next writer of the same destination,
# once their marker shows the writer is gone.

#: the file that marks a directory as written by normdeploy
MARKER = ".normdeploy-output"
#: infixes of the scratch directories beside a destination ``D``: ``.D.tmp-<pid>-*`` (being
#: written) and ``.D.old-<pid>-*`` (the previous ``D`` while it is swapped out)
SCRATCH_KINDS = ("tmp", "old")


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux ``/proc``), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def marker_record(role: str) -> dict:
    """What :data:`MARKER` holds: who wrote the directory, and as what (``output``, ``entry``, ``scratch``)."""
    from ..core.version import __version__

    pid = os.getpid()
    return {"written_by": "normdeploy", "version": __version__, "role": role, "pid": pid,
            "pid_start": _start_time(pid), "host": socket.gethostname()}


#: the marker while it is written (renamed to MARKER when complete: a kill mid-write leaves no half marker)
PARTIAL_MARKER = MARKER + ".partial"


def write_marker(directory: str, role: str) -> None:
    partial = os.path.join(directory, PARTIAL_MARKER)
    with open(partial, "w") as f:
        json.dump(marker_record(role), f, sort_keys=True)
        f.write("\n")
    os.chmod(partial, 0o666 & ~current_umask())
    os.replace(partial, os.path.join(directory, MARKER))


def remove_scratch(path: str) -> None:
    """Delete a marked directory normdeploy wrote, its marker last: a kill midway leaves it still marked
    (or empty), so the next run can finish the job."""
    if os.path.islink(path) or not os.path.isdir(path):
        return
    for name in os.listdir(path):
        if name == MARKER:
            continue
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass
    try:
        os.unlink(os.path.join(path, MARKER))
    except OSError:
        pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def read_marker(directory: str) -> dict | None:
    """The marker of ``directory`` (a real directory, not a link), or None when it has none."""
    if os.path.islink(directory) or not os.path.isdir(directory):
        return None
    path = os.path.join(directory, MARKER)
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("written_by") == "normdeploy" else None


def written_by_normdeploy(directory: str) -> bool:
    return read_marker(directory) is not None


def writer_gone(pid, host=None, start=None) -> bool:
    """Whether the process that wrote a marker has ended; False whenever that cannot be told (another
    host, another user's live process), so that a live writer's scratch is never taken from it."""
    if not isinstance(pid, int) or pid <= 0 or (host is not None and host != socket.gethostname()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return False
    if _process_state(pid) in ("Z", "X"):  # ended, not yet reaped by its parent
        return True
    now = _start_time(pid)
    return start is not None and now is not None and now != start  # the pid was reused


def scratch_prefix(base: str, kind: str) -> str:
    return f".{base}.{kind}-{os.getpid()}-"


def make_scratch(base: str, kind: str, parent: str, role: str = "scratch", record: list | None = None) -> str:
    """A marked scratch directory ``parent/.base.kind-<pid>-*`` with the umask's mode; ``role`` is what
    its marker says it becomes (``output`` or ``entry`` for the directory renamed into place).

    ``record``: a list the path is appended to as soon as it exists, so that a caller interrupted
    (SIGTERM raised as an exception) before this returns still knows what to remove.
    """
    path = mkdtemp(prefix=scratch_prefix(base, kind), dir=parent)
    if record is not None:
        record.append(path)
    write_marker(path, role)
    return path


def _scratch_pid(name: str, base: str, kind: str) -> int | None:
    rest = name[len(f".{base}.{kind}-"):]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def clean_stale(parent: str, base: str, dest: str | None = None) -> list[str]:
    """Remove the scratch directories of destination ``parent/base`` whose writer is gone; returns them.

    Only directories named ``.base.tmp-<pid>-*`` / ``.base.old-<pid>-*`` that carry :data:`MARKER`
    are removed, and only when that pid has ended; an unmarked one is removed only when
    empty (a writer killed between creating it and marking it) and the pid in its name has ended.
    A stale ``.old-`` directory still holding the previous output while the destination is missing
    (a writer killed between its two renames) is first renamed back into place. ``dest``: the
    destination, where it is not ``parent/base`` (Triton entries keep their scratch beside the repository).
    """
    dest = dest or os.path.join(parent, base)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    removed = []
    for kind in ("old", "tmp"):  # old first: a previous output to restore goes back before its successor's scratch is removed
        for name in names:
            if not name.startswith(f".{base}.{kind}-"):
                continue
            path = os.path.join(parent, name)
            if os.path.islink(path) or not os.path.isdir(path):
                continue
            pid, rec = _scratch_pid(name, base, kind), read_marker(path)
            if rec is None:  # killed before its marker was complete, or after it was removed: empty but for that
                try:
                    if pid is not None and writer_gone(pid) and set(os.listdir(path)) <= {PARTIAL_MARKER}:
                        for name in os.listdir(path):
                            os.unlink(os.path.join(path, name))
                        os.rmdir(path)
                        removed.append(path)
                except OSError:
                    pass
                continue
            # the writer is the pid in the name (after a swap, a .tmp- directory holds the previous
            # output, whose marker names its own writer); the marker adds its host and start time
            if pid is None or not writer_gone(pid, rec.get("host"),
                                              rec.get("pid_start") if rec.get("pid") == pid else None):
                continue
            try:
                if kind == "old":
                    previous = [os.path.join(path, n) for n in os.listdir(path) if n != MARKER]
                    if not os.path.lexists(dest) and len(previous) == 1 and written_by_normdeploy(previous[0]):
                        os.rename(previous[0], dest)
                remove_scratch(path)
                if not os.path.lexists(path):
                    removed.append(path)
            except OSError:
                pass
    return removed


_RENAME_EXCHANGE = 2


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this kernel or file system cannot: the two-rename fallback
    raise OSError(err, os.strerror(err), b)


def check_replaceable(path: str, what: str) -> None:
    """Raise the one-line InputError unless ``path`` may be replaced: absent, an empty directory, or
    a directory normdeploy wrote (it carries :data:`MARKER`). Links are never replaced."""
    if os.path.islink(path):
        raise InputError(f"{what} {path} is a symbolic link (to {os.path.realpath(path)}); normdeploy never "
                         "replaces a link", "give the directory itself or another path")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise InputError(f"{what} {path} exists and is a file", "choose another path")
    if os.listdir(path) and not written_by_normdeploy(path):
        raise InputError(f"{what} {path} is not empty and was not written by normdeploy (it has no {MARKER} "
                         "file); normdeploy replaces only directories it wrote",
                         "choose another path, or empty or remove that directory yourself")


def replace_dir(tmp: str, dest: str, what: str, scratch: str | None = None, base: str | None = None) -> None:
    """Put the complete directory ``tmp`` in place of ``dest`` (absent or replaceable), atomically where the
    platform can swap two directories; the previous ``dest`` is deleted only once the new one is in place.

    On failure ``dest`` is left as it was (the previous output restored if it had been moved aside).
    ``scratch`` / ``base``: where the ``.base.old-*`` directory of the fallback goes (default: beside ``dest``).
    """
    parent, base = scratch or os.path.dirname(dest), base or os.path.basename(dest)
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    check_replaceable(dest, what)  # again, right before: it may have changed since the first check
    if exchange(tmp, dest):
        remove_scratch(tmp)  # tmp holds the previous output now
        return
    made: list[str] = []
    try:
        old = make_scratch(base, "old", parent, record=made)
        moved = os.path.join(old, "previous")
        os.rename(dest, moved)
        os.rename(tmp, dest)
    except BaseException:
        for old in made:
            moved = os.path.join(old, "previous")
            if not os.path.lexists(dest) and os.path.lexists(moved):
                os.rename(moved, dest)
            remove_scratch(old)
        raise
    remove_scratch(old)
