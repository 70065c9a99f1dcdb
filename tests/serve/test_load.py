"""Concurrent load on a real tritonserver: several clients, a bounded number of requests of mixed batch
sizes; every request answered, none lost, every answer equal to ONNX Runtime in-process. The figures
(throughput, p50/p99 at 1, 4 and 16 clients, next to ONNX Runtime in-process) are printed; the quiet-machine
run that writes benchmarks/results/serving.md is benchmarks/serving.py, which these functions come from."""
from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.serving import checker, client_call, measure, run_clients, stats, workload

pytestmark = pytest.mark.slow  # a real server, and normdeploy optimize of two models first
REQUESTS = int(os.environ.get("NORMDEPLOY_LOAD_REQUESTS", "150"))


def test_1_4_16_clients_every_request_answered_correctly(server, models):
    model = models["digits"]
    table = measure(server, model.name, os.path.join(model.out, "model.onnx"), model.x, requests=REQUESTS)
    print(f"\n{REQUESTS} requests per level, batch 1..64 mixed:\nclients  path                      req/s  "
          "samples/s  p50 ms  p99 ms  correct/sent  bit-identical")
    for n, row in table.items():
        for label, s in row.items():
            print(f"{n:>7}  {label:<24} {s['req_per_s']:>6.0f} {s['samples_per_s']:>10.0f} {s['p50_ms']:>7.2f} "
                  f"{s['p99_ms']:>7.2f}  {s['ok']:>5}/{s['sent']:<5}  {s['exact']}")
    for n, row in table.items():
        for label, s in row.items():
            assert s["requests"] == s["sent"] == REQUESTS, f"{label} x{n}: {s['sent'] - s['requests']} requests lost"
            assert (s["wrong"], s["error"]) == (0, 0) and s["ok"] == REQUESTS, f"{label} x{n}: {s}"
            assert s["p99_ms"] >= s["p50_ms"] > 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_token_model_under_concurrent_load(server, models, protocol):
    model = models["llama"]
    work = workload(80, seed=5, n_samples=len(model.x))
    call = client_call(protocol, server.grpc_url if protocol == "grpc" else server.http_url, model.name, model.input,
                       model.output, model.x, checker(model.reference()))
    records, wall = run_clients(8, work, call)
    s = stats(records, wall, work)
    assert s["requests"] == len(work) and s["ok"] == len(work), [r for r in records if r[1] != "ok"][:3]


def test_bad_and_good_requests_interleaved_under_load(server, models):
    """Every third request is malformed: it alone is refused; the others, batched with it, are answered right."""
    from tritonclient.utils import InferenceServerException

    model = models["digits"]
    good = client_call("grpc", server.grpc_url, model.name, model.input, model.output, model.x,
                       checker(model.reference()))
    bad_x = np.zeros((1, 1, 8, 9), np.float32)

    def call(state, idx):
        state["n"] = state.get("n", 0) + 1
        if state["n"] % 3:
            return good(state, idx)
        import tritonclient.grpc as g

        inp = g.InferInput(model.input, [len(idx), *bad_x.shape[1:]], "FP32")
        inp.set_data_from_numpy(np.repeat(bad_x, len(idx), 0))
        try:
            state["c"].infer(model.name, [inp], client_timeout=30.0)
            return "wrong", "a malformed request was served"
        except InferenceServerException as e:
            return ("ok", 0.0) if "unexpected shape for input 'input'" in e.message() else ("wrong", e.message())

    work = workload(120, seed=7, n_samples=len(model.x))
    records, _ = run_clients(8, work, call)
    assert len(records) == len(work) and all(r[1] == "ok" for r in records), \
        [r for r in records if r[1] != "ok"][:3]
