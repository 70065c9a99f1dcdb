"""Issue 16, item 1: normdeploy never deletes what it did not write.

``normdeploy optimize model.pt --out . --force`` used to replace the current directory (the
input, the user's notes and sources with it). Now an ``--out`` that contains the input, is
the current directory, one above it or the home directory is refused, and ``--force``
replaces only a directory that carries normdeploy's marker (``package.files.MARKER``); a
Triton entry of the same name that normdeploy did not write is refused the same way.
"""
import json
import os

import onnx
import pytest

from normdeploy.package import files
from tests.cli.test_bad_input import conv_bn_model


def _project(tmp_path):
    """A user's project folder: the model, notes and a source file."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    onnx.save(conv_bn_model(), proj / "model.onnx")
    (proj / "notes.txt").write_text("my notes")
    (proj / "src" / "train.py").write_text("print('train')")
    return proj


def _snapshot(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def _one_line_error(r, *phrases):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for p in phrases:
        assert p in err, err


@pytest.mark.parametrize("out", [".", "..", "src/..", "./"])
def test_out_current_directory_or_above_is_refused_even_with_force(cli, tmp_path, monkeypatch, out):
    proj = _project(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(proj)
    r = cli("optimize", "model.onnx", "--out", out, "--force", "--no-bench")
    _one_line_error(r, "current")
    assert _snapshot(tmp_path) == before


def test_out_containing_the_input_is_refused(cli, tmp_path, monkeypatch):
    proj = _project(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = cli("optimize", proj / "model.onnx", "--out", proj, "--force", "--no-bench")
    _one_line_error(r, "contains the input")
    assert _snapshot(tmp_path) == before


def test_out_containing_the_input_is_refused_even_when_normdeploy_wrote_it(cli, tmp_path, monkeypatch):
    """Optimizing out/model.onnx again into out/ would replace the input: refused, not half done."""
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    r = cli("optimize", "model.onnx", "--out", "out", "--no-bench")
    assert r.exit_code == 0, r.stderr
    before = _snapshot(proj)
    r = cli("optimize", "out/model.onnx", "--out", "out", "--force", "--no-bench")
    _one_line_error(r, "contains the input")
    assert _snapshot(proj) == before


def test_home_directory_is_refused(cli, tmp_path, monkeypatch):
    proj = _project(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(proj)
    r = cli("optimize", "model.onnx", "--out", home, "--force", "--no-bench")
    _one_line_error(r, "home directory")
    assert (home / ".bashrc").read_text() == "export X=1"


def test_force_replaces_only_a_directory_normdeploy_wrote(cli, tmp_path, monkeypatch):
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    mine = proj / "results"
    mine.mkdir()
    (mine / "table.csv").write_text("a,b\n1,2\n")
    r = cli("optimize", "model.onnx", "--out", "results", "--force", "--no-bench")
    _one_line_error(r, "not written by normdeploy", files.MARKER, "remove that directory yourself")
    assert (mine / "table.csv").read_text() == "a,b\n1,2\n" and sorted(os.listdir(mine)) == ["table.csv"]
    # normdeploy's own output directory carries the marker and is replaced by --force
    r = cli("optimize", "model.onnx", "--out", "out", "--no-bench")
    assert r.exit_code == 0, r.stderr
    marker = json.loads((proj / "out" / files.MARKER).read_text())
    assert marker["written_by"] == "normdeploy" and marker["role"] == "output" and marker["pid"] == os.getpid()
    (proj / "out" / "report.md").write_text("stale")
    r = cli("optimize", "model.onnx", "--out", "out", "--force", "--no-bench")
    assert r.exit_code == 0, r.stderr
    assert (proj / "out" / "report.md").read_text() != "stale"
    assert not [n for n in os.listdir(proj) if n.startswith(".out.")], os.listdir(proj)
    # an empty directory (nothing to lose) is written without --force
    (proj / "empty").mkdir()
    assert cli("optimize", "model.onnx", "--out", "empty", "--no-bench").exit_code == 0
    assert (proj / "empty" / files.MARKER).exists()


def test_a_symlinked_out_is_never_replaced(cli, tmp_path, monkeypatch):
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    assert cli("optimize", "model.onnx", "--out", "out", "--no-bench").exit_code == 0
    os.symlink(proj / "out", proj / "link")
    r = cli("optimize", "model.onnx", "--out", "link", "--force", "--no-bench")
    _one_line_error(r, "symbolic link")
    assert os.path.islink(proj / "link") and (proj / "out" / "model.onnx").exists()


def test_python_api_refuses_the_same(tmp_path, monkeypatch):
    import normdeploy
    from normdeploy.core.errors import InputError

    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    result = normdeploy.optimize("model.onnx", bench=False)
    before = _snapshot(tmp_path)
    for out in (".", str(proj), str(tmp_path)):
        with pytest.raises(InputError):
            result.save(out, force=True)
    assert _snapshot(tmp_path) == before
    (proj / "mine").mkdir()
    (proj / "mine" / "a.txt").write_text("a")
    with pytest.raises(InputError, match="not written by normdeploy"):
        result.save("mine", force=True)
    assert (proj / "mine" / "a.txt").read_text() == "a"


def test_a_hand_written_triton_entry_is_not_replaced(cli, tmp_path, monkeypatch):
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    hand = proj / "repo" / "model"  # the entry name normdeploy picks for model.onnx
    (hand / "1").mkdir(parents=True)
    (hand / "config.pbtxt").write_text('name: "model"\nbackend: "onnxruntime"\n')
    r = cli("optimize", "model.onnx", "--out", "out", "--no-bench", "--triton-repo", "repo")
    _one_line_error(r, "Triton entry", "not written by normdeploy")
    assert (hand / "config.pbtxt").read_text().startswith('name: "model"') and not (proj / "out").exists()
    r = cli("optimize", "model.onnx", "--out", "out", "--no-bench", "--triton-repo", "repo2")
    assert r.exit_code == 0, r.stderr
    assert (proj / "repo2" / "model" / files.MARKER).exists()
    r = cli("optimize", "model.onnx", "--out", "out", "--force", "--no-bench", "--triton-repo", "repo2")
    assert r.exit_code == 0, r.stderr  # its own entry it replaces
    assert not [n for n in os.listdir(proj) if n.startswith(".repo2.")], os.listdir(proj)
