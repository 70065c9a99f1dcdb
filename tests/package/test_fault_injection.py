"""Issue 16, item 6: the output directory survives a writer killed at any point of its write.

A real ``normdeploy optimize`` process is killed (SIGKILL, SIGTERM) at each stage of the write:
right after its scratch directory ``.out.tmp-<pid>-*`` is made, after ``model.onnx`` is saved,
once everything is written, right after the atomic swap, and between the two renames of the
fallback path (the previous output parked in ``.out.old-<pid>-*``). After it, ``out`` holds the
previous output untouched (or, killed after the swap, the complete new one), and the next run
leaves no scratch behind and puts a parked previous output back. A full disk (ENOSPC on a
write) and a failed rename are simulated in-process. Scratch of a writer that is still alive,
and anything without normdeploy's marker, is never touched.
"""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import onnx
import pytest

from normdeploy.package import files
from tests.cli.test_bad_input import conv_bn_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: a normdeploy optimize process that kills itself (a real signal) at one point of the write
DRIVER = textwrap.dedent('''
    import os, signal, sys
    point, sig = sys.argv[1], getattr(signal, sys.argv[2])
    import normdeploy.package as package
    from normdeploy.package import files

    def die():
        os.kill(os.getpid(), sig)
        signal.pause() if sig == signal.SIGSTOP else None

    def after(obj, name, when=lambda *a: True):
        real = getattr(obj, name)
        def wrapper(*a, **k):
            out = real(*a, **k)
            if when(*a):
                die()
            return out
        setattr(obj, name, wrapper)

    def before(obj, name):
        real = getattr(obj, name)
        def wrapper(*a, **k):
            die()
            return real(*a, **k)
        setattr(obj, name, wrapper)

    if point == "scratch":
        after(files, "make_scratch")
    elif point == "model":
        after(package, "save_model", lambda model, path: path.endswith("model.onnx") and "original" not in path)
    elif point == "written":
        before(files, "replace_dir")
    elif point == "swapped":
        after(files, "exchange")
    elif point == "moved":
        files.exchange = lambda a, b: False
        after(files.os, "rename", lambda src, dst: os.path.basename(dst) == "previous")
    from normdeploy.cli import main
    main(sys.argv[3:], prog_name="normdeploy")
''')

POINTS = ("scratch", "model", "written", "swapped", "moved")


def _digest_tree(d):
    return {os.path.relpath(os.path.join(r, f), d): hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, fs in os.walk(d) for f in fs}


def _scratch(parent, base="out"):
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


@pytest.fixture
def two_models(tmp_path):
    """Two models whose outputs differ: ``a`` was written before, ``b`` is the write that gets killed."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_bn_model(), a)
    onnx.save(conv_bn_model(gamma=[1.0, 2.0, 0.5, -1.0]), b)
    return a, b


def _write_previous(cli, model, out):
    r = cli("optimize", model, "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    return _digest_tree(out)


def _complete(out):
    names = set(os.listdir(out))
    assert {files.MARKER, "model.onnx", "original.onnx", "report.json", "report.md", "triton"} <= names, names
    json.loads(open(os.path.join(out, "report.json")).read())
    onnx.checker.check_model(onnx.load(os.path.join(out, "model.onnx")))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("point", POINTS)
def test_killed_writer_leaves_the_previous_output_and_the_next_run_cleans_up(cli, tmp_path, two_models, point, sig):
    a, b = two_models
    out = tmp_path / "out"
    previous = _write_previous(cli, a, out)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, str(driver), point, sig, "optimize", str(b), "--out", str(out), "--force",
                           "--no-bench"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    want = -signal.SIGKILL if sig == "SIGKILL" else 143
    assert proc.returncode == want, (proc.returncode, proc.stderr[-2000:])
    if sig == "SIGTERM":  # caught: the command cleaned up itself and said so in one line
        assert proc.stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing was written"
        assert _scratch(tmp_path) == [], _scratch(tmp_path)
    else:
        assert _scratch(tmp_path), "SIGKILL cannot be caught: its scratch is left for the next run"
    if point == "swapped":  # the swap is atomic: out is the complete new output
        _complete(out)
        written = _digest_tree(out)
        assert written != previous
    elif point == "moved" and sig == "SIGKILL":  # between the two renames: out is parked in .out.old-*
        assert not out.exists()
        written = previous
    else:
        assert _digest_tree(out) == previous
        written = previous
    # the next run (refused here: no --force) removes the dead writer's scratch and restores a parked output
    r = cli("optimize", a, "--out", out, "--no-bench")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert _scratch(tmp_path) == [], _scratch(tmp_path)
    assert _digest_tree(out) == written


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_writer_killed_from_outside_mid_write(cli, tmp_path, two_models, sig, delay):
    """The same with the signal sent by another process, ``delay`` seconds after the scratch directory appears."""
    import time

    a, b = two_models
    out = tmp_path / "out"
    previous = _write_previous(cli, a, out)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "normdeploy.cli", "optimize", str(b), "--out", str(out),
                             "--force", "--no-bench"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not _scratch(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    # whatever instant it hit: out is either the previous output or the complete new one, never a mix
    if out.exists() and _digest_tree(out) != previous:
        _complete(out)
        written = _digest_tree(out)
    else:
        written = previous
    r = cli("optimize", a, "--out", out, "--no-bench")
    assert r.exit_code == 2
    assert _scratch(tmp_path) == [], _scratch(tmp_path)
    assert _digest_tree(out) == written


def test_a_full_disk_leaves_the_previous_output(cli, tmp_path, two_models, monkeypatch):
    """ENOSPC at a write: one line naming free space, the previous output intact, no scratch."""
    import normdeploy.package as package

    a, b = two_models
    out = tmp_path / "out"
    previous = _write_previous(cli, a, out)
    real = package.save_model

    def full(model, path):
        real(model, path)
        if path.endswith("model.onnx"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(package, "save_model", full)
    r = cli("optimize", b, "--out", out, "--force", "--no-bench")
    assert r.exit_code == 2, r.stderr
    assert r.stderr.strip() == (f"error: cannot write output directory {out}: No space left on device; "
                                "check free space and permissions")
    assert _digest_tree(out) == previous and _scratch(tmp_path) == []


@pytest.mark.parametrize("swap", [True, False])
def test_a_failed_rename_restores_the_previous_output(cli, tmp_path, two_models, monkeypatch, swap):
    """The last rename fails (the atomic swap, or the fallback's second rename): out as it was, no .out.old-*."""
    a, b = two_models
    out = tmp_path / "out"
    previous = _write_previous(cli, a, out)
    real_rename = os.rename

    def failing_exchange(x, y):
        raise OSError(errno.EIO, os.strerror(errno.EIO), y)

    def failing_rename(src, dst):
        if os.path.basename(src).startswith(".out.tmp-") and str(dst) == str(out):
            raise OSError(errno.EIO, os.strerror(errno.EIO), dst)
        return real_rename(src, dst)

    monkeypatch.setattr(files, "exchange", failing_exchange if swap else (lambda x, y: False))
    monkeypatch.setattr(files.os, "rename", failing_rename)
    r = cli("optimize", b, "--out", out, "--force", "--no-bench")
    assert r.exit_code == 2 and "cannot write output directory" in r.stderr
    assert _digest_tree(out) == previous and _scratch(tmp_path) == []


def test_only_a_dead_writers_marked_scratch_is_cleaned(cli, tmp_path, two_models):
    """Scratch of a live writer stays; unmarked look-alikes (the user's) stay; a dead writer's goes."""
    a, _ = two_models
    out = tmp_path / "out"
    _write_previous(cli, a, out)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        def scratch(pid, kind="tmp", marked=True, content="x"):
            d = tmp_path / f".out.{kind}-{pid}-abc{kind}{marked}"
            d.mkdir()
            (d / "model.onnx").write_text(content)
            if marked:
                rec = {**files.marker_record("output"), "pid": pid, "pid_start": files._start_time(pid)}
                (d / files.MARKER).write_text(json.dumps(rec))
            return d

        live_tmp = scratch(live.pid)
        dead_tmp, dead_old = scratch(dead.pid), scratch(dead.pid, "old")
        users = scratch(dead.pid, marked=False, content="the user's own")
        empty_unmarked = tmp_path / f".out.tmp-{dead.pid}-empty"
        empty_unmarked.mkdir()
        r = cli("optimize", a, "--out", out, "--no-bench")  # refused (no --force), but cleans first
        assert r.exit_code == 2
        assert live_tmp.exists() and users.exists() and (users / "model.onnx").read_text() == "the user's own"
        assert not dead_tmp.exists() and not dead_old.exists() and not empty_unmarked.exists()
        live.kill()
        live.wait()
        assert files.clean_stale(str(tmp_path), "out") == [str(live_tmp)]
        assert users.exists()
    finally:
        live.kill()
        live.wait()


def test_a_marker_names_this_process_and_a_reused_pid_is_told_apart():
    rec = files.marker_record("output")
    assert rec["pid"] == os.getpid() and rec["written_by"] == "normdeploy"
    assert not files.writer_gone(os.getpid(), rec["host"], rec["pid_start"])
    if rec["pid_start"] is not None:  # Linux: the same pid with another start time is another process
        assert files.writer_gone(os.getpid(), rec["host"], str(int(rec["pid_start"]) + 1))
    assert not files.writer_gone(os.getpid(), "another-host", None)  # never judged across hosts


def test_a_half_written_marker_or_a_half_removed_scratch_is_cleaned_too(cli, tmp_path, two_models):
    """Killed while writing its marker (only the ``.partial`` file exists) or while removing its scratch
    (the marker goes last, so what is left is still marked): the next run removes both."""
    a, _ = two_models
    out = tmp_path / "out"
    _write_previous(cli, a, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = tmp_path / f".out.tmp-{dead.pid}-partial"
    partial.mkdir()
    (partial / files.PARTIAL_MARKER).write_text('{"written_by": "normd')
    half = tmp_path / f".out.tmp-{dead.pid}-half"
    (half / "triton").mkdir(parents=True)
    (half / files.MARKER).write_text(json.dumps({**files.marker_record("output"), "pid": dead.pid,
                                                 "pid_start": None}))
    assert cli("optimize", a, "--out", out, "--no-bench").exit_code == 2
    assert _scratch(tmp_path) == []


def test_scratch_removal_takes_the_marker_last(tmp_path, monkeypatch):
    d = tmp_path / ".out.tmp-1-x"
    (d / "sub").mkdir(parents=True)
    (d / "model.onnx").write_text("m")
    files.write_marker(str(d), "output")
    seen = []
    real = os.unlink

    def unlink(p, *a, **k):
        seen.append(os.path.basename(p))
        return real(p, *a, **k)

    monkeypatch.setattr(files.os, "unlink", unlink)
    files.remove_scratch(str(d))
    assert not d.exists() and seen[-1] == files.MARKER
