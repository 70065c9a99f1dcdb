"""Every plugin kernel timed against torch, the way an engine would run it: ``scripts/gpu_check.sh``'s benchmark.

On a CUDA device each case compiles the plugin's AOT kernel exactly as ``aot_impl`` does for that
GPU (trimmed PTX, the oldest ISA of the architecture), has the driver JIT it and launches it as
TensorRT's AOT launch does (:mod:`normdeploy.lower.plugins.cuda_launch`); TensorRT would time the
tactics and keep the faster, so both are timed and the faster is reported. Peers on the same
tensors: ``torch.nn.functional.rms_norm`` / ``normalize`` / the eager expression, ``layer_norm``
(what TensorRT's own normalization layer does, for scale), and ``torch.compile`` of the reference
module from :mod:`normdeploy.nn` (rows dynamic, width static; fp16 and rows >= 4096 only, to
keep the compile time inside the budget). Every output is checked against the reference computed in fp32.
Achieved bandwidth counts the bytes a kernel must move (x read once, y written once, the
parameters once) over its time, and is quoted against the device's copy bandwidth
(``dst.copy_(src)``, read + write), measured first.

Without CUDA the same cases run with the kernels under the Triton interpreter (CPU), each AOT
kernel is still compiled to PTX for sm_90 and launched under the interpreter with TensorRT's
arguments: a small setting (``--small``) proves the script end to end in CI.

    python normdeploy/lower/plugins/gpu_bench.py --out benchmarks/results/gpu_kernels.md [--small] [--budget-s 330]

Runs from a checkout whose dependencies are not all installed (a bare GPU machine with torch and
Triton): the plugin modules and ``normdeploy.nn`` are loaded without ``normdeploy/__init__.py``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import math
import os
import platform
import re
import sys
import time
import types


def _light_package():
    """``normdeploy``'s directory as a package whose ``__init__`` is not run (it imports the whole pipeline)."""
    if __package__:
        top = __package__.split(".")[0]
        return top, importlib.import_module(f"{top}.lower.plugins.kernels")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name = "_normdeploy_light"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [root]
        sys.modules[name] = pkg
    return name, importlib.import_module(f"{name}.lower.plugins.kernels")


PKG, K = _light_package()
T = importlib.import_module(f"{PKG}.lower.plugins.trt_plugins")

KINDS = ("rmsnorm", "crmsnorm", "group_scaling", "scalenorm", "dyt", "dyt_plain")
PLUGIN = {"rmsnorm": "NormdeployRMSNorm", "crmsnorm": "NormdeployCRMSNorm", "group_scaling": "NormdeployGroupScaling",
          "scalenorm": "NormdeployScaleNorm", "dyt": "NormdeployDynamicTanh", "dyt_plain": "NormdeployDynamicTanhPlain"}
DTYPES = ("fp16", "bf16", "fp32")  # in this order, so that a budget cut drops fp32 first
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
FULL = {"widths": (64, 192, 768, 4096, 16384), "rows": (1, 16, 256, 4096, 65536), "tactics": (1, 2)}
SMALL = {"widths": (64, 192), "rows": (3,), "tactics": (1,)}
GROUPS = 4
EPS = 1e-5
ALPHA = 0.5
COMPILE_MIN_ROWS = 4096
#: torch.compile is timed for these dtypes only (each width is a compile, a few seconds each)
COMPILE_DTYPES = ("fp16",)


def _torch_dtype(torch, name):
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _attrs(kind: str, scale: float) -> dict:
    return {"rmsnorm": {"epsilon": EPS}, "crmsnorm": {"epsilon": EPS},
            "group_scaling": {"groups": GROUPS, "epsilon": EPS},
            "scalenorm": {"scale": scale, "epsilon": EPS}, "dyt": {"alpha": ALPHA, "axis": -1},
            "dyt_plain": {"alpha": ALPHA}}[kind]


class Timer:
    """Per-call time of ``fn``: CUDA events on the current stream (CUDA) or perf_counter (CPU); the median of
    three measurements, each at least ``min_ms`` of calls after a warm-up."""

    def __init__(self, torch, cuda: bool, min_ms: float):
        self.torch, self.cuda, self.min_ms = torch, cuda, min_ms

    def __call__(self, fn) -> float:
        torch = self.torch
        for _ in range(3 if self.cuda else 1):
            fn()
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)
        reps = max(5, min(10000, int(self.min_ms / one)))
        samples = []
        for _ in range(3):
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / reps)
        return sorted(samples)[1]


def copy_bandwidth(torch, cuda: bool) -> float | None:
    """Device-to-device copy, bytes read + written per second (GB/s); None on CPU."""
    if not cuda:
        return None
    n = 1 << 29  # 2 GiB of fp32 each way
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = Timer(torch, True, 50.0)(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def reference_modules(torch, c: int, scale: float, w, b, g):
    """fp32 reference modules of :mod:`normdeploy.nn` with the case's parameters."""
    nn_ref = importlib.import_module(f"{PKG}.nn")
    mods = {"rmsnorm": nn_ref.RMSNorm(c, eps=EPS), "crmsnorm": nn_ref.CRMSNorm(c, eps=EPS),
            "group_scaling": nn_ref.GroupScaling(GROUPS, eps=EPS), "scalenorm": nn_ref.ScaleNorm(c, eps=EPS),
            "dyt": nn_ref.DynamicTanh(c, alpha_init=ALPHA), "dyt_plain": nn_ref.DynamicTanh(c, alpha_init=ALPHA)}
    with torch.no_grad():
        mods["rmsnorm"].weight.copy_(g)
        mods["crmsnorm"].weight.copy_(g)
        mods["scalenorm"].scale.fill_(scale)
        mods["dyt"].weight.copy_(w)
        mods["dyt"].bias.copy_(b)
    return {k: m.eval() for k, m in mods.items()}


def _pytest_summary(path: str | None) -> list[str]:
    """The outcome lines of the ``pytest -m gpu`` log: the summary, and each skip, failure or error with its reason."""
    if not path or not os.path.exists(path):
        return []
    keep = []
    for line in open(path, errors="replace").read().splitlines():
        line = line.strip()
        if line.startswith(("SKIPPED", "FAILED", "ERROR", "== pytest")) or re.match(
                r"^=*\s*\d+ (passed|failed|skipped|deselected|errors?)\b", line):
            keep.append(line.strip("= "))
    return keep


def run(out: str, small: bool = False, budget_s: float = 330.0, device: str | None = None, log=print,
        notes: str | None = None) -> dict:
    import numpy as np
    import torch
    import triton

    t_start = time.perf_counter()
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dev = "cuda" if cuda else "cpu"
    setting = SMALL if small else FULL
    timer = Timer(torch, cuda, 20.0 if cuda else 0.0)
    bw = copy_bandwidth(torch, cuda)
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
        isa = T.MIN_PTX_ISA.get(arch)
        gpu = torch.cuda.get_device_name()
        from importlib import import_module

        launcher_mod = import_module(f"{PKG}.lower.plugins.cuda_launch")
    else:
        arch, isa, gpu, launcher_mod = 90, T.MIN_PTX_ISA[90], None, None
    log(f"device {gpu or 'cpu (Triton interpreter)'}, sm_{arch}, copy bandwidth "
        f"{'%.0f GB/s' % bw if bw else 'n/a'}; torch {torch.__version__}, triton {triton.__version__}")
    results, skipped = [], 0
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in DTYPES:
        tdt = _torch_dtype(torch, dtype)
        size = torch.finfo(tdt).bits // 8
        for c in setting["widths"]:
            # parameters rounded to the activation dtype first: the kernels read them in it, and so does the reference
            g, w, b = (torch.randn(c, generator=gen).to(tdt).float() for _ in range(3))
            scale = math.sqrt(c)
            refs = reference_modules(torch, c, scale, w, b, g)
            compiled: dict = {}
            for kind in KINDS:
                plugin = PLUGIN[kind]
                spec = T.PLUGINS[plugin]
                params32 = {"rmsnorm": [g], "crmsnorm": [g], "dyt": [w, b]}.get(kind, [])
                params = [p.to(dev, tdt) for p in params32]
                for rows in setting["rows"]:
                    if time.perf_counter() - t_start > budget_s:
                        skipped += 1
                        continue
                    x = torch.randn((rows, c), generator=gen).to(dev, tdt)
                    y = torch.empty_like(x)
                    with torch.no_grad():
                        ref = refs[kind].to(dev)(x.float())
                    case = {"kernel": kind, "plugin": plugin, "dtype": dtype, "width": c, "rows": rows,
                            "x_align": x.data_ptr() % 16, "y_align": y.data_ptr() % 16,
                            "vector_path": x.data_ptr() % 16 == 0 and y.data_ptr() % 16 == 0 and (c * size) % 16 == 0}
                    io = [dtype] * (len(spec.inputs) + 1)
                    best = None
                    for tactic in setting["tactics"]:
                        aot = T.build_aot_kernel(plugin, io, (rows, c), _attrs(kind, scale), tactic, target=arch,
                                                 ptx_version=isa)
                        if cuda:
                            fn = launcher_mod.AotLauncher(aot).bind(x, *params, y)
                        else:
                            fn = (lambda aot=aot: T.interpret_aot_launch(aot, [x, *params, y]))
                        ms = timer(fn)
                        if best is None or ms < best[0]:
                            best = (ms, tactic, aot)
                    fn = (lambda: launcher_mod.AotLauncher(best[2])(x, *params, y)) if cuda else \
                        (lambda: T.interpret_aot_launch(best[2], [x, *params, y]))
                    fn()
                    if cuda:
                        torch.cuda.synchronize()
                    err = ((y.float() - ref).abs() / (ref.abs() + 0.01 * ref.abs().max())).max().item()
                    moved = rows * c * 2 * size + sum(p.numel() * p.element_size() for p in params)
                    case.update(ms=best[0], tactic=best[1], err=err, ok=bool(err <= TOL[dtype]),
                                block=best[2].block[0], grid=best[2].grid[0], gbps=moved / (best[0] * 1e-3) / 1e9)
                    case["frac_copy"] = case["gbps"] / bw if bw else None
                    torch_ms = {}
                    with torch.no_grad():
                        if kind in ("rmsnorm", "crmsnorm"):  # crmsnorm: same bytes, no torch op of its own
                            gp = params[0]
                            torch_ms["F.rms_norm"] = timer(lambda: torch.nn.functional.rms_norm(x, (c,), gp, EPS))
                        elif kind == "group_scaling":
                            xv = x.view(rows, GROUPS, c // GROUPS)
                            torch_ms["F.rms_norm"] = timer(
                                lambda: torch.nn.functional.rms_norm(xv, (c // GROUPS,), None, EPS))
                        elif kind == "scalenorm":
                            torch_ms["F.normalize"] = timer(
                                lambda: torch.nn.functional.normalize(x, dim=-1, eps=EPS).mul_(scale))
                        elif kind == "dyt":
                            wp, bp = params
                            torch_ms["eager"] = timer(lambda: torch.addcmul(bp, wp, torch.tanh(ALPHA * x)))
                        else:
                            torch_ms["eager"] = timer(lambda: torch.tanh(ALPHA * x))
                        if kind not in ("dyt", "dyt_plain"):
                            lw, lb = torch.ones(c, device=dev, dtype=tdt), torch.zeros(c, device=dev, dtype=tdt)
                            torch_ms["F.layer_norm"] = timer(
                                lambda: torch.nn.functional.layer_norm(x, (c,), lw, lb, EPS))
                        if cuda and rows >= COMPILE_MIN_ROWS and dtype in COMPILE_DTYPES:
                            try:
                                if kind not in compiled:
                                    mod = copy.deepcopy(refs[kind]).to(dev, tdt)  # refs stay fp32
                                    compiled[kind] = torch.compile(mod, dynamic=False)
                                torch._dynamo.mark_dynamic(x, 0)
                                cm = compiled[kind]
                                torch_ms["torch.compile"] = timer(lambda: cm(x))
                            except Exception as e:  # noqa: BLE001 - no compiler on the host, an Inductor limit...
                                case["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    case["torch_ms"] = torch_ms
                    peers = [v for k, v in torch_ms.items() if k != "F.layer_norm"]
                    case["speedup"] = min(peers) / best[0] if peers and best[0] > 0 else None
                    results.append(case)
                    log(f"{kind:13s} {dtype} C={c:5d} rows={rows:5d}: {best[0]:.4f} ms (tactic {best[1]}), "
                        f"{case['gbps']:.1f} GB/s, err {err:.2g} {'ok' if case['ok'] else 'FAIL'}; torch "
                        + ", ".join(f"{k} {v:.4f} ms" for k, v in torch_ms.items()))
                    del x, y, ref
            if cuda:
                torch.cuda.empty_cache()
    if cuda:  # the scalar path: the same case with x one element off 16-byte alignment
        c, rows = 4096, 4096
        base = torch.randn(rows * c + 1, device="cuda").half()
        x = base[1:].view(rows, c)
        y = torch.empty_like(x)
        gp = torch.randn(c, device="cuda").half()
        aot = T.build_aot_kernel("NormdeployRMSNorm", ["fp16"] * 3, (rows, c), {"epsilon": EPS}, 1, target=arch,
                                 ptx_version=isa)
        ms = timer(launcher_mod.AotLauncher(aot).bind(x, gp, y))
        results.append({"kernel": "rmsnorm", "plugin": "NormdeployRMSNorm", "dtype": "fp16", "width": c, "rows": rows,
                        "x_align": x.data_ptr() % 16, "y_align": y.data_ptr() % 16, "vector_path": False, "ms": ms,
                        "tactic": 1, "gbps": rows * c * 4 / (ms * 1e-3) / 1e9, "frac_copy": None, "ok": True,
                        "err": 0.0, "torch_ms": {}, "speedup": None, "note": "x misaligned by 2 bytes: scalar path"})
        results[-1]["frac_copy"] = results[-1]["gbps"] / bw if bw else None
    summary = {"device": gpu or "cpu (Triton interpreter)", "arch": arch, "ptx_isa": isa, "copy_gbps": bw,
               "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
               "numpy": np.__version__, "small": small, "seconds": time.perf_counter() - t_start,
               "skipped_for_budget": skipped, "failures": sum(not r["ok"] for r in results),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "pytest_gpu": _pytest_summary(notes), "cases": results}
    write_markdown(out, summary)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _f(v, fmt=".4f"):
    return "–" if v is None else format(v, fmt)


def write_markdown(path: str, s: dict) -> None:
    bw = s["copy_gbps"]
    lines = ["# Plugin kernels against torch", "",
             f"Measured by `scripts/gpu_check.sh` on **{s['device']}** (sm_{s['arch']}, PTX ISA "
             f"{s['ptx_isa'] / 10 if s['ptx_isa'] else '?'}), torch {s['torch']}, Triton {s['triton']}, "
             f"{s['date']}, {s['seconds']:.0f} s"
             + ("; the small CI setting, under the Triton interpreter: times are not GPU times" if bw is None else "")
             + ".", "",
             f"Device copy bandwidth (`dst.copy_(src)`, 2 GiB, read + write): **{_f(bw, '.0f')} GB/s**. "
             "Our kernel: the plugin's AOT PTX (trimmed, oldest ISA), JIT-compiled by the driver and launched with "
             "`cuLaunchKernel` as TensorRT's AOT launch does, the faster tactic. GB/s = bytes that must move "
             "(x read once, y written once, parameters once) / time; `% copy` = that over the copy bandwidth. "
             "Speedup = the fastest torch peer (layer_norm excluded: another op) / ours. Error: max |ours - ref| / "
             "(|ref| + 0.01 max |ref|) against the fp32 reference module (fp32 1e-5, fp16 2e-3, bf16 1.6e-2).", ""]
    if s["skipped_for_budget"]:
        lines += [f"{s['skipped_for_budget']} cases were not measured: the time budget ran out.", ""]
    lines += [f"Failures: {s['failures']}.", ""]
    if s.get("pytest_gpu"):
        lines += ["`pytest -m gpu` (tests/build):", ""] + [f"- {x}" for x in s["pytest_gpu"]] + [""]
    head = ("| kernel | dtype | C | rows | ours ms | tactic | GB/s | % copy | torch peers (ms) | torch.compile ms | "
            "speedup | error | x, y align | vector path |")
    lines += [head, "|" + "---|" * 14]
    for r in s["cases"]:
        peers = ", ".join(f"{k} {v:.4f}" for k, v in r["torch_ms"].items() if k != "torch.compile")
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['width']} | {r['rows']} | {r['ms']:.4f} | {r['tactic']} | "
                     f"{r['gbps']:.1f} | {_f(r['frac_copy'] * 100 if r.get('frac_copy') else None, '.0f')} | "
                     f"{peers or r.get('note', '–')} | {_f(r['torch_ms'].get('torch.compile'))} | "
                     f"{_f(r['speedup'], '.2f')} | {r['err']:.1e}{'' if r['ok'] else ' FAIL'} | "
                     f"{r['x_align']}, {r['y_align']} | {'yes' if r['vector_path'] else 'no'} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown report (a .json with every figure is written beside it)")
    ap.add_argument("--small", action="store_true", help="two widths, 3 rows, one tactic (CI)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--notes", help="the pytest -m gpu log, whose outcome lines go into the report")
    args = ap.parse_args(argv)
    s = run(args.out, args.small, args.budget_s, args.device, notes=args.notes)
    print(f"wrote {args.out}: {len(s['cases'])} cases, {s['failures']} failures, {s['seconds']:.0f} s")
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
