"""``normdeploy serve OUT_DIR``: README's serving section run as written, the printed client call, Ctrl-C,
and one-line errors for a directory normdeploy did not write, a port in use, and no serving environment."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import MODELS, ROOT
from tests.package.test_triton import recorded_trt  # noqa: F401 - a fixture: trt-* builds on the recording stand-in

NORMDEPLOY = os.path.join(os.path.dirname(sys.executable), "normdeploy")
FREE_PORTS = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]


class Serving:
    """``normdeploy serve ...`` as a subprocess: its output read up to "Ctrl-C stops it.", then stopped."""

    def __init__(self, args, cwd, timeout=120):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen([NORMDEPLOY, "serve", *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops it.") or line.startswith("{"):
                return
        self.stop()
        pytest.fail("normdeploy serve did not get ready:\n" + "\n".join(self.lines))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def interrupt(self, timeout=60) -> int:
        """Ctrl-C: SIGINT to normdeploy alone, as a terminal sends it (the server runs in its own session)."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=timeout)
        self.lines += self.proc.stdout.read().splitlines()
        return code

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _one_line_error(r) -> str:
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), r.stderr
    return err


@pytest.mark.slow
def test_readme_serving_section_runs_as_written(tmp_path, serve_env):
    """The bash block (optimize, serve) and the client call of README's "Serving" section, ports made free."""
    text = open(os.path.join(ROOT, "README.md")).read().split("## Serving", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in bash.splitlines()]
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    optimize = next(c for c in commands if " optimize " in c).split()
    serve = next(c for c in commands if " serve " in c).split()
    assert any("setup_serve.sh" in c for c in commands)
    os.symlink(MODELS, tmp_path / "models")
    run = subprocess.run([NORMDEPLOY, *optimize[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    serving = Serving([*serve[2:], *FREE_PORTS], cwd=tmp_path)
    try:
        port = re.search(r"HTTP +http://127\.0\.0\.1:(\d+)", serving.text).group(1)
        code = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        assert code != snippet
        got = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert got.returncode == 0, got.stderr[-2000:]
        printed = got.stdout.strip()
        expected_comment = next(line for line in snippet.splitlines() if line.startswith("print(")).split("# ", 1)[1]
        import onnxruntime as ort

        x = np.load(os.path.join(MODELS, "digits_test.npz"))["input"][:8]
        session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert printed == str(session.run(None, {"input": x})[0].argmax(1)) == expected_comment.strip()
        assert serving.interrupt() == 0
        assert serving.lines[-1].startswith("stopped (tritonserver exit status 0)")
    finally:
        serving.stop()


@pytest.mark.slow
def test_serve_prints_a_client_call_that_works_and_stops_on_ctrl_c(models, serve_env, tmp_path):
    model = models["llama"]
    serving = Serving([model.out, *FREE_PORTS], cwd=tmp_path)
    try:
        text = serving.text
        assert re.search(rf"tritonserver ready in [\d.]+ s: '{model.name}' \(python backend, max_batch_size 64\)", text)
        for label in ("HTTP     http://127.0.0.1:", "gRPC     127.0.0.1:", "metrics  http://127.0.0.1:"):
            assert label in text
        snippet = "\n".join(line[4:] for line in text.split("query it from Python", 1)[1].splitlines()[1:]
                            if line.startswith("    ") or not line)
        got = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
        assert got.returncode == 0, snippet + got.stderr[-2000:]
        assert got.stdout.strip() == str((1, *model.ort([0]).shape[1:]))
        assert serving.interrupt() == 0
    finally:
        serving.stop()
    assert "stopped (tritonserver exit status 0)" in serving.text


@pytest.mark.slow
def test_serve_an_onnxruntime_entry_through_its_python_variant(tmp_path, serve_env, models):
    """An output written for NGC's servers (backend onnxruntime): served from a Python-backend variant, said so."""
    import normdeploy

    out = normdeploy.optimize(os.path.join(MODELS, "digits_cnn_bn_un.pt"), bench=False).save(str(tmp_path / "out"))
    serving = Serving([out, "--json", *FREE_PORTS], cwd=tmp_path)
    try:
        info = json.loads(serving.lines[-1])
        (served,) = info["models"]
        assert served["backend"] == "python" and "is a onnxruntime entry" in served["note"]
        assert info["http"].startswith("127.0.0.1:") and info["grpc"].startswith("127.0.0.1:")
        import tritonclient.grpc as g

        model = models["digits"]
        client = g.InferenceServerClient(info["grpc"])
        x = model.x[:16]
        inp = g.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer(served["name"], [inp]).as_numpy(model.output),
                                      model.ort(slice(0, 16)))
        client.close()
        assert serving.interrupt() == 0
    finally:
        serving.stop()


# ----------------------------------------------------------------------------- bad input (no server needed)

@pytest.fixture
def tiny_out(tmp_path):
    """An output directory as normdeploy writes it (report.json naming a Python-backend entry), for a tiny model."""
    from onnx import TensorProto, helper

    from normdeploy.package.triton import plan_entry, write_repository
    from normdeploy.package.triton_python import entry_parameters

    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]),
                          opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "out"
    write_repository(str(out / "triton"), "tiny", m, backend="python")
    summary = plan_entry(m, "tiny", "python", parameters=entry_parameters()).to_json()
    (out / "report.json").write_text(json.dumps({"target": "ort-cpu", "triton": summary}))
    return str(out)


def test_a_directory_normdeploy_did_not_write(cli, tmp_path):
    r = cli("serve", tmp_path)
    assert r.exit_code == 2
    assert _one_line_error(r) == (f"error: {tmp_path} is not an output directory of normdeploy optimize (no readable "
                                  f"report.json); run `normdeploy optimize MODEL --out {tmp_path} --triton-backend "
                                  "python` first")
    r = cli("serve", tmp_path / "missing")
    assert r.exit_code == 2 and "is not a directory" in _one_line_error(r)
    (tmp_path / "report.json").write_text(json.dumps({"target": "trt-fp16"}))  # a --lower-only output: no entry
    r = cli("serve", tmp_path)
    assert r.exit_code == 2 and "has no Triton entry described in its report.json" in _one_line_error(r)


def test_a_port_in_use(cli, tiny_out):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", tiny_out, "--http-port", "0", "--grpc-port", port, "--metrics-port", "0")
    assert r.exit_code == 2
    assert _one_line_error(r) == (f"error: port {port} on 127.0.0.1 is in use (gRPC); stop what listens there, or "
                                  "pass --grpc-port with a free port (0 picks one)")


def test_no_serving_environment(cli, tiny_out, tmp_path):
    r = cli("serve", tiny_out, *FREE_PORTS, "--serve-python", tmp_path / "nope" / "python")
    assert r.exit_code == 2
    err = _one_line_error(r)
    assert err.startswith(f"error: no Python at {tmp_path / 'nope' / 'python'}; run scripts/setup_serve.sh")
    r = cli("serve", tiny_out, *FREE_PORTS, "--serve-python", sys.executable)
    if r.exit_code == 2:  # normdeploy's own venv has no nvidia-pytriton (it may where numpy<2 and pytriton are there)
        assert _one_line_error(r).startswith(f"error: nvidia-pytriton is not installed for {sys.executable}; run "
                                             "scripts/setup_serve.sh")


@pytest.mark.slow
def test_serve_a_tensorrt_entry_through_its_python_variant(cli, tmp_path, serve_env, recorded_trt):
    """A trt-* output (engine from the recording stand-in): its model.onnx served with the engine's batching."""
    import onnx

    from normdeploy.verify.precision import plugins_as_functions
    from tests.conftest import ort_run

    out = tmp_path / "out"
    r = cli("optimize", os.path.join(MODELS, "digits_cnn_bn_un.pt"), "--target", "trt-fp32", "--out", out,
            "--no-bench", "--batch", "1:4:16")
    assert r.exit_code == 0, r.stderr
    serving = Serving([str(out), "--json", *FREE_PORTS], cwd=tmp_path)
    try:
        (served,) = json.loads(serving.lines[-1])["models"]
        assert served["max_batch_size"] == 16 and "is a tensorrt entry" in served["note"]
        import tritonclient.http as h
        from tritonclient.utils import InferenceServerException

        client = h.InferenceServerClient(json.loads(serving.lines[-1])["http"])
        x = np.load(os.path.join(MODELS, "digits_test.npz"))["input"]
        inp = h.InferInput("input", [16, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[:16])
        (want,) = ort_run(plugins_as_functions(onnx.load(str(out / "model.onnx"))), x[:16])
        got = client.infer(served["name"], [inp]).as_numpy(served["outputs"][0])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
        inp = h.InferInput("input", [17, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[:17])
        with pytest.raises(InferenceServerException, match=f"batch-size must be <= 16 for '{served['name']}'"):
            client.infer(served["name"], [inp])
        client.close()
        assert serving.interrupt() == 0
    finally:
        serving.stop()
