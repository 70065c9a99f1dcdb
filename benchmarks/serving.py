"""normdeploy's output served by a real Triton Inference Server, under concurrent load.

    .venv/bin/python benchmarks/serving.py [--requests 2000] [--out benchmarks/results/serving.md]

Optimizes ``models/digits_cnn_bn_un.pt`` with ``--triton-backend python``, starts
tritonserver 2.51 (nvidia-pytriton, from ``.serve-venv``: ``scripts/setup_serve.sh``) on
127.0.0.1, and sends the same fixed workload (mixed batch sizes 1 to 64, drawn once per
level with a fixed seed) from 1, 4 and 16 concurrent clients over gRPC and over HTTP, and
to ONNX Runtime in-process (one shared session, the server's options: 1 intra-op thread,
sequential) as the baseline. Every answer is checked against ONNX Runtime in-process on the
same samples; a request lost, failed or wrong is counted and fails the run. Reports
requests/s, samples/s and the p50/p99 latency of each request, and the machine's load
average around the run: figures taken while other work loads the machine say so.

tests/serve/test_load.py drives the same functions with a smaller workload and asserts on them.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
BATCH_WEIGHTS = (.25, .15, .15, .15, .1, .1, .1)
#: gRPC channel options: fast reconnects after a server restart (tritonclient's defaults are replaced
#: whole by channel_args, so the message limits are set again)
GRPC_ARGS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
             ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 500)]


def workload(total: int, seed: int, n_samples: int, max_batch: int = 64) -> list[np.ndarray]:
    """``total`` requests, each the sample indices of one batch (sizes 1..max_batch, mixed)."""
    rng = np.random.default_rng(seed)
    sizes = [b for b in BATCH_SIZES if b <= max_batch]
    weights = np.array(BATCH_WEIGHTS[:len(sizes)])
    batches = rng.choice(sizes, size=total, p=weights / weights.sum())
    return [rng.choice(n_samples, size=int(b), replace=n_samples < b) for b in batches]


def run_clients(n_clients: int, work: list, call, deadline_s: float = 300.0):
    """Split ``work`` over ``n_clients`` threads, each calling ``call(state, item)`` per request.

    ``call`` returns ``(outcome, detail)`` with outcome "ok", "wrong" or "error" (an exception
    counts as "error"). Returns the records ``(latency_s, outcome, detail)`` of every request
    and the wall time. Bounded: a fixed list of work, and threads joined by the deadline
    (a thread still running then is a failure the caller sees as missing records).
    """
    per = [work[i::n_clients] for i in range(n_clients)]
    records: list[list] = [[] for _ in range(n_clients)]
    stop_at = time.monotonic() + deadline_s

    def worker(k):
        state: dict = {}
        for item in per[k]:
            if time.monotonic() > stop_at:
                break
            t0 = time.perf_counter()
            try:
                outcome = call(state, item)
            except Exception as e:  # noqa: BLE001 - a failure is an outcome to count
                outcome = ("error", repr(e)[:200])
            records[k].append((time.perf_counter() - t0, *outcome))
        for c in state.values():
            if hasattr(c, "close"):
                c.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + 5)
    return [r for rs in records for r in rs], time.perf_counter() - t0


def stats(records: list, wall: float, work: list) -> dict:
    lat = np.array([r[0] for r in records]) * 1e3
    samples = sum(len(i) for i in work)
    outcomes = [r[1] for r in records]
    return {"requests": len(records), "sent": len(work), "ok": outcomes.count("ok"), "wrong": outcomes.count("wrong"),
            "error": outcomes.count("error"), "exact": sum(1 for r in records if r[1] == "ok" and r[2] == 0.0),
            "wall_s": wall, "req_per_s": len(records) / wall, "samples_per_s": samples / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def checker(reference: np.ndarray, rel_tol: float = 1e-5):
    """``check(out, idx)`` -> ("ok", max abs error) when ``out`` matches ``reference[idx]``, else ("wrong", why)."""
    atol = rel_tol * float(np.abs(reference).max())

    def check(out, idx):
        want = reference[idx]
        if out is None or out.shape != want.shape or out.dtype != want.dtype:
            return "wrong", f"shape {None if out is None else (out.shape, out.dtype)}, expected {want.shape}"
        err = float(np.abs(out - want).max())
        return ("ok", err) if err <= atol else ("wrong", f"max abs error {err:.3g} > {atol:.3g}")
    return check


def client_call(protocol: str, url: str, model: str, input_name: str, output_name: str, x: np.ndarray,
                check, timeout_s: float = 30.0):
    """A ``call`` for :func:`run_clients` sending ``x[idx]`` to ``model`` over ``protocol`` ("http" | "grpc")."""
    def call(state, idx):
        if protocol == "http":
            import tritonclient.http as mod

            client = state.get("c") or state.setdefault(
                "c", mod.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s))
        else:
            import tritonclient.grpc as mod

            client = state.get("c") or state.setdefault("c", mod.InferenceServerClient(url, channel_args=GRPC_ARGS))
        batch = np.ascontiguousarray(x[idx])
        inp = mod.InferInput(input_name, list(batch.shape), DATATYPES[batch.dtype.name])
        inp.set_data_from_numpy(batch)
        kwargs = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        return check(client.infer(model, [inp], **kwargs).as_numpy(output_name), idx)
    return call


DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


def ort_session(path: str, threads: int = 1):
    """ONNX Runtime with the options of the server's model.py (intra-op threads, 1 inter-op, sequential)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def measure(server, model: str, onnx_path: str, x: np.ndarray, levels=(1, 4, 16), requests: int = 2000,
            max_batch: int = 64) -> dict:
    """Every level over gRPC, HTTP and ONNX Runtime in-process; {level: {path: stats}}. Outcomes are not judged here."""
    session = ort_session(onnx_path)
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    reference = np.concatenate([session.run(None, {input_name: x[i:i + 1]})[0] for i in range(len(x))])
    check = checker(reference)

    def in_process(state, idx):
        return check(session.run([output_name], {input_name: np.ascontiguousarray(x[idx])})[0], idx)

    table = {}
    for n in levels:
        work = workload(requests, seed=n, n_samples=len(x), max_batch=max_batch)
        row = {}
        for label, call in (("gRPC", client_call("grpc", server.grpc_url, model, input_name, output_name, x, check)),
                            ("HTTP", client_call("http", server.http_url, model, input_name, output_name, x, check)),
                            ("ONNX Runtime in-process", in_process)):
            records, wall = run_clients(n, work, call)
            row[label] = stats(records, wall, work)
        table[n] = row
    return table


def load_note() -> tuple[str, bool]:
    """The load average and whether the machine was busy (1-min load above half its cores)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown", False
    cores = os.cpu_count() or 1
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {cores} cores", one > 0.5 * cores


def render(table: dict, meta: dict) -> str:
    lines = ["# Serving: normdeploy's output in a real Triton Inference Server", "",
             f"Generated by `.venv/bin/python benchmarks/serving.py --requests {meta['requests']}` in "
             f"{meta['seconds']:.0f} s on {meta['date']}.", "",
             f"Machine: {meta['cpu']} ({platform.machine()}), {os.cpu_count()} cores shared by the clients and the "
             f"server; {meta['load_before']} before, {meta['load_after']} after.", ""]
    if meta["loaded"]:
        lines += ["**Taken under load**: other work was running on this machine (load average above half its cores "
                  "before or after the run); the figures are lower and noisier than on a quiet machine.", ""]
    lines += [f"Server: tritonserver {meta['triton']} (nvidia-pytriton {meta['pytriton']}), Python backend, "
              f"normdeploy's model.py running `{meta['model']}`'s optimized model.onnx on onnxruntime {meta['ort']} "
              "(1 instance, 1 intra-op thread, dynamic batching, max_batch_size 64), bound to 127.0.0.1. "
              f"Workload: {meta['requests']} requests per level, batch sizes 1 to 64 mixed "
              "(25 % of size 1; 15 % each of 2, 4, 8; 10 % each of 16, 32, 64), the same requests for every path; "
              "clients are Python threads with tritonclient (HTTP: geventhttpclient, gRPC: grpcio). Latency is per "
              "request, from send to the checked answer.", "",
              "| clients | path | req/s | samples/s | p50 ms | p99 ms | correct / sent | bit-identical |",
              "|---|---|---|---|---|---|---|---|"]
    for n, row in table.items():
        for label, s in row.items():
            lines.append(f"| {n} | {label} | {s['req_per_s']:,.0f} | {s['samples_per_s']:,.0f} | {s['p50_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} | {s['ok']} / {s['sent']} | {s['exact']} |")
    lines += ["", "Every answer is compared with ONNX Runtime in-process on the same samples (one sample at a time): "
              "*correct* within 1e-5 of the output's range, *bit-identical* exactly equal. The server's overhead "
              "per request is the network stack, Triton's scheduling and the Python backend's shared-memory hop; "
              "the dynamic batcher joins concurrent requests, which is what lets several clients outrun one.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per level and path")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serving.md"))
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import onnxruntime

    import normdeploy
    from normdeploy.serve import ServeEnv, TritonServer

    t0 = time.time()
    load_before, busy_before = load_note()
    env = ServeEnv.find()
    x = np.load(os.path.join(ROOT, "models", "digits_test.npz"))["input"]
    with tempfile.TemporaryDirectory(prefix="normdeploy-serving-") as d:
        result = normdeploy.optimize(os.path.join(ROOT, "models", "digits_cnn_bn_un.pt"), bench=False)
        out = result.save(os.path.join(d, "out"), triton_backend="python")
        name = result.report["triton"]["name"]
        with TritonServer(os.path.join(out, "triton"), env=env) as server:
            table = measure(server, name, os.path.join(out, "model.onnx"), x, requests=a.requests)
    load_after, busy_after = load_note()
    bad = [(n, label, s) for n, row in table.items() for label, s in row.items() if s["ok"] != s["sent"]]
    meta = {"requests": a.requests, "seconds": time.time() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": _cpu(), "load_before": load_before, "load_after": load_after, "loaded": busy_before or busy_after,
            "triton": "2.51", "pytriton": env.packages.get("nvidia-pytriton"), "model": "digits_cnn_bn_un",
            "ort": onnxruntime.__version__}
    text = render(table, meta)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    if bad:
        print(f"error: requests lost, failed or wrong: {[(n, label, s['ok'], s['sent']) for n, label, s in bad]}",
              file=sys.stderr)
        return 1
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
