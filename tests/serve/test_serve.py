"""normdeploy.serve against a real tritonserver: answers equal ONNX Runtime in-process over HTTP and gRPC,
bad requests get Triton's error and the server keeps serving, a server killed mid-load serves again after a
restart without a wrong answer, and a broken entry is reported."""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a real server, and normdeploy optimize of two models first

h = pytest.importorskip("tritonclient.http")
g = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from benchmarks.serving import GRPC_ARGS, checker  # noqa: E402

PROTOCOLS = ("http", "grpc")


def _client(server, protocol):
    if protocol == "http":
        return h.InferenceServerClient(server.http_url, network_timeout=30.0, connection_timeout=30.0)
    return g.InferenceServerClient(server.grpc_url, channel_args=GRPC_ARGS)


def _infer(client, model, x, *, name=None, datatype=None, model_name=None):
    mod = h if isinstance(client, h.InferenceServerClient) else g
    inp = mod.InferInput(name or model.input, list(x.shape), datatype or model.datatype)
    inp.set_data_from_numpy(np.ascontiguousarray(x))
    kwargs = {"client_timeout": 30.0} if mod is g else {}
    return client.infer(model_name or model.name, [inp], **kwargs).as_numpy(model.output)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("key", ["digits", "llama"])
def test_every_output_equals_onnxruntime_in_process(server, models, protocol, key):
    """One client, one request at a time: each answer is what ONNX Runtime in-process gives for that batch."""
    model = models[key]
    client = _client(server, protocol)
    rng = np.random.default_rng(0)
    for batch in (1, 2, 7, 33, model.max_batch):
        idx = rng.choice(len(model.x), size=batch, replace=False)
        got, want = _infer(client, model, model.x[idx]), model.ort(idx)
        assert got.dtype == want.dtype and got.shape == want.shape == (batch, *want.shape[1:])
        np.testing.assert_array_equal(got, want, err_msg=f"{key} over {protocol}, batch {batch}")
    client.close()


def test_the_server_loads_the_entries_as_written(server, models):
    for model in models.values():
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model.name}/config", timeout=10) as r:
            cfg = json.load(r)
        entry = model.report["triton"]
        assert cfg["backend"] == "python" and cfg["max_batch_size"] == entry["max_batch_size"] == 64
        assert {i["name"]: [int(d) for d in i["dims"]] for i in cfg["input"]} == entry["inputs"]
        assert {o["name"]: [int(d) for d in o["dims"]] for o in cfg["output"]} == entry["outputs"]
        assert "dynamic_batching" in cfg and cfg["instance_group"][0]["kind"] == "KIND_CPU"
        meta = json.load(urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model.name}", timeout=10))
        assert meta["platform"] == "python" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": model.input, "datatype": model.datatype, "shape": [-1] + model.dims}]
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert all(f'nv_inference_request_success{{model="{m.name}",version="1"}}' in metrics for m in models.values())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, models, protocol):
    model = models["digits"]
    name, x = model.name, model.x
    client = _client(server, protocol)
    expected_dims = ",".join(map(str, [-1] + model.dims))
    bad = {  # what is sent -> Triton's answer, status (HTTP) / code (gRPC)
        "wrong input name": (dict(x=x[:2], name="inp"), f"unexpected inference input 'inp' for model '{name}'", 400),
        "wrong shape": (dict(x=np.zeros((2, 1, 8, 9), np.float32)),
                        f"unexpected shape for input 'input' for model '{name}'. Expected [{expected_dims}], "
                        "got [2,1,8,9]", 400),
        "wrong rank": (dict(x=np.zeros((2, 64), np.float32)),
                       f"unexpected shape for input 'input' for model '{name}'. Expected [{expected_dims}], got [2,64]",
                       400),
        "wrong dtype": (dict(x=x[:2].astype(np.float64), datatype="FP64"),
                        f"inference input 'input' data-type is 'FP64', but model '{name}' expects 'FP32'", 400),
        "batch above the maximum": (dict(x=np.zeros((model.max_batch + 1, 1, 8, 8), np.float32)),
                                    f"inference request batch-size must be <= {model.max_batch} for '{name}'", 400),
        "unknown model": (dict(x=x[:2], model_name="nope"), "Request for unknown model: 'nope' is not found", 404),
    }
    rng = np.random.default_rng(1)
    for what, (kwargs, message, status) in bad.items():
        with pytest.raises(InferenceServerException) as e:
            _infer(client, model, **kwargs)
        assert message in e.value.message(), (what, e.value.message())
        want_status = str(status) if protocol == "http" else \
            ("StatusCode.NOT_FOUND" if status == 404 else "StatusCode.INVALID_ARGUMENT")
        assert str(e.value.status()) == want_status, (what, e.value.status())
        idx = rng.choice(len(x), size=5, replace=False)  # and still serving correct answers
        np.testing.assert_array_equal(_infer(client, model, x[idx]), model.ort(idx))
    client.close()
    assert server.running()


def test_malformed_http_bodies_get_an_error_and_the_server_keeps_serving(server, models):
    model = models["digits"]
    url = f"http://{server.http_url}/v2/models/{model.name}/infer"
    short = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    for body, message in ((b"{not json", "failed to parse the request JSON buffer"),
                          (b'{"inputs": 3}', "Unable to parse 'inputs'"),
                          (json.dumps(short).encode(), "Shape does not match true shape of 'data' field")):
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code >= 400 and message in json.loads(e.value.read())["error"]  # 2.51 answers these with 500
    client = _client(server, "http")
    np.testing.assert_array_equal(_infer(client, model, model.x[:8]), model.ort(slice(0, 8)))
    client.close()


def test_killed_mid_load_then_restarted(serve_env, repository, models):
    """SIGKILL while 4 clients send (2 HTTP, 2 gRPC): they see errors, never a wrong answer, and every
    client is answered correctly again after the restart (same ports)."""
    from normdeploy.serve import TritonServer, _group_alive

    model = models["digits"]
    check = checker(model.reference())
    srv = TritonServer(repository[0], env=serve_env, models=[model.name], start_timeout=120)
    stop, lock, records = threading.Event(), threading.Lock(), []
    phase = {"now": "before"}  # before -> down -> after
    deadline = time.monotonic() + 150

    def worker(k):
        client, rng, sent = None, np.random.default_rng(10 + k), 0
        protocol = PROTOCOLS[k % 2]
        while not stop.is_set() and sent < 2000 and time.monotonic() < deadline:
            idx = rng.choice(len(model.x), size=int(rng.choice([1, 4, 16, 64])), replace=False)
            p, t0 = phase["now"], time.monotonic()
            try:
                client = client or _client(srv, protocol)
                outcome, detail = check(_infer(client, model, model.x[idx]), idx)
            except Exception as e:  # noqa: BLE001 - a failure is an outcome
                outcome, detail = "error", repr(e)[:160]
                if protocol == "http" and client is not None:  # a broken connection pool: start afresh
                    client.close()
                    client = None
                time.sleep(0.02)
            sent += 1
            with lock:
                records.append((p, outcome, detail, k, t0, time.monotonic()))
        if client is not None:
            client.close()

    def count(p, outcome, k=None):
        with lock:
            return sum(1 for r in records if r[0] == p and r[1] == outcome and (k is None or r[3] == k))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
    try:
        srv.start()
        ports = srv.ports
        for t in threads:
            t.start()
        while count("before", "ok") < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        pgid = srv.proc.pid
        phase["now"] = "down"
        t_kill = time.monotonic()
        srv.kill()
        assert not _group_alive(pgid), f"the killed server's stubs outlived it: {srv.last_reap}"
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(srv.shm_prefix)], "shared memory left behind"
        while count("down", "error") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.start()
        assert srv.ports == ports  # clients keep their addresses
        t_ready = time.monotonic()
        phase["now"] = "after"
        while time.monotonic() < deadline and not all(count("after", "ok", k) >= 10 for k in range(4)):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        srv.close()
    assert not any(t.is_alive() for t in threads)
    summary = {p: {o: count(p, o) for o in ("ok", "wrong", "error")} for p in ("before", "down", "after")}
    print(f"\nkilled mid-load, restarted in {srv.startup_s:.2f} s: {summary}")
    assert sum(s["wrong"] for s in summary.values()) == 0, [r for r in records if r[1] == "wrong"][:3]
    assert summary["down"]["error"] >= 4, "the clients did not notice the dead server"
    assert not [r for r in records if r[1] == "error" and r[5] < t_kill], "errors before the kill"
    for k in range(4):  # after its first answer past the restart, a client never fails again
        mine = sorted((r for r in records if r[3] == k and r[4] >= t_ready), key=lambda r: r[4])
        first = next(i for i, r in enumerate(mine) if r[1] == "ok")
        assert all(r[1] == "ok" for r in mine[first:]), (k, [r[:3] for r in mine[first:] if r[1] != "ok"][:3])
        assert count("after", "ok", k) >= 10, f"client {k} was not served again after the restart"
    assert not srv.running()


def test_a_broken_entry_is_reported_with_its_error(tmp_path, serve_env):
    from normdeploy.serve import ServeError, TritonServer

    entry = tmp_path / "repository" / "broken"
    (entry / "1").mkdir(parents=True)
    (entry / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    (entry / "1" / "model.py").write_text("raise ImportError('no module named frobnicate')\n")
    srv = TritonServer(str(tmp_path / "repository"), env=serve_env, start_timeout=60)
    with pytest.raises(ServeError) as e:
        srv.start()
    srv.close()
    assert "no module named frobnicate" in str(e.value) and not srv.running()
    assert "\n" not in str(e.value)
