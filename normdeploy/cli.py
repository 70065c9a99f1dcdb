"""The ``normdeploy`` command line.

Errors a user can cause print one line (``error: what is wrong; what to do``) on stderr
and exit non-zero, with no traceback unless ``--debug``; see :mod:`normdeploy.errors`.
"""
from __future__ import annotations

import json
import os

import click

from .cli_common import _common, _errors, _Progress
from .errors import InputError
from .pipeline import Options

EXAMPLE = """
\b
Example:
  normdeploy optimize models/digits_cnn_bn_un.pt --data models/digits_test.npz --out out/
  normdeploy optimize model.onnx --input input_ids:1x128:int64 --target ort-cpu --out out/ --json
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLE)
@click.version_option(package_name="normdeploy")
def main():
    """Fold, fuse or exactly replace the normalization layers of a model, then build and benchmark it."""


@main.command(epilog=EXAMPLE)
@click.argument("model", type=click.Path(dir_okay=False))
@_common
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: <model name>.normdeploy next to the current directory).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output directory.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Real inputs for the accuracy check: an .npz with one array per model input.")
@click.option("--batch", default=None, metavar="N|MIN:OPT:MAX",
              help="Batch for latency (OPT), and the TensorRT optimization profile's range (default: the input's).")
@click.option("--bench-seconds", type=float, default=3.0, show_default=True, help="Time budget of the latency run.")
@click.option("--no-bench", is_flag=True, help="Skip the latency measurement.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: available cores, at most 8).")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Largest accepted max relative error of the optimized model against the original (exact rewrites).")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration inputs (.npz, one array per model input) for --allow-approx.")
@click.option("--max-error", type=float, default=1e-2, show_default=True,
              help="With --allow-approx: largest accepted max relative error; above it the run is refused.")
@click.option("--ort-rms-op", type=click.Choice(["simplified", "standard"]), default="simplified", show_default=True,
              help="ort-* targets: RMSNorm as ONNX Runtime's SimplifiedLayerNormalization (fastest measured) or as "
                   "the standard opset-23 RMSNormalization (the file then passes onnx.checker).")
@click.option("--lower-only", is_flag=True,
              help="trt-* targets: write the plugin-lowered, precision-converted ONNX and stop (no GPU needed).")
@click.option("--io-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="trt-fp16/bf16: dtype of the model's inputs and outputs.")
@click.option("--workspace", default=None, metavar="SIZE", help="TensorRT workspace limit, e.g. 2G.")
@click.option("--opt-level", type=int, default=None, help="TensorRT builder optimization level 0-5.")
@click.option("--hardware-compat", default="none", show_default=True, metavar="none|ampere+|same-cc",
              help="TensorRT hardware compatibility of the engine.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="TensorRT timing cache file, read if present and written back (reused across builds).")
@click.option("--triton-repo", type=click.Path(file_okay=False), default=None,
              help="Also write the model into this Triton Inference Server model repository.")
@click.option("--fp16", is_flag=True,
              help="ort-* targets: run the optimized model in fp16, normalization statistics in fp32.")
@click.option("--engine-cache", type=click.Path(file_okay=False), default=None,
              help="ort-trt: directory for ONNX Runtime's TensorRT engine and timing caches.")
def optimize(model, inputs, target, opset, trust_pickle, allow_approx, preln_form, as_json, debug, out, force, data, batch,
             bench_seconds, no_bench, threads, tolerance, calib, max_error, ort_rms_op, lower_only, io_dtype, workspace,
             opt_level, hardware_compat, timing_cache, triton_repo, fp16, engine_cache):
    """Optimize MODEL (.onnx, TorchScript .pt, torch.export .pt2 or a torch.save'd nn.Module)."""
    from . import package, pipeline

    with _errors(debug):
        out = out or os.path.splitext(os.path.basename(model))[0] + ".normdeploy"
        package.check_writable(out, force)
        opts = Options(target=target, inputs=inputs, data=data, trust_pickle=trust_pickle, opset=opset, batch=batch,
                       bench_seconds=bench_seconds, bench=not no_bench, threads=threads, tolerance=tolerance,
                       allow_approx=allow_approx, calib=calib, max_error=max_error, preln_form=preln_form,
                       ort_rms_op=ort_rms_op, lower_only=lower_only, io_dtype=io_dtype, workspace=workspace,
                       opt_level=opt_level, hardware_compat=hardware_compat, timing_cache=timing_cache,
                       fp16=fp16, engine_cache=engine_cache)
        pipeline.resolve_target(opts)  # a missing GPU or TensorRT is said before any work
        if triton_repo:
            if lower_only:
                raise InputError("--triton-repo with --lower-only: the lowered model has TensorRT plugin nodes that "
                                 "no Triton backend serves", "build the engine on a GPU host (drop --lower-only)")
            package.check_writable(triton_repo, force=True)
        with _Progress(not as_json) as progress:
            result = pipeline.optimize(model, opts, progress)
            progress("write", None)
            path = package.write(out, result, force=force, triton_repo=triton_repo)
        report = package._jsonable(result.report)
        if as_json:
            click.echo(json.dumps({"out": path, **report}, indent=2))
        else:
            _print_summary(report, path)


def _print_summary(r: dict, path: str) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"normalization nodes ({r['target']})")
    t.add_column("kind")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for k in sorted(set(r["norm_nodes"]["before"]) | set(r["norm_nodes"]["after"])):
        t.add_row(k, str(r["norm_nodes"]["before"].get(k, 0)), str(r["norm_nodes"]["after"].get(k, 0)))
    c.print(t)
    a = r["accuracy"]
    c.print(f"accuracy: max abs err {a['max_abs_err']:.3g}, max rel err {a['max_rel_err']:.3g}, "
            f"min cosine {a['cosine_min']:.9f}" + (f", top-1 agreement {a['top1_agreement']:.2%}"
                                                   if a.get("top1_agreement") is not None else ""))
    lat = r.get("latency")
    if lat and lat.get("speedup") is None:
        c.print(f"TensorRT engine latency (batch {lat['batch']}): {lat['optimized']}")
    elif lat:
        left = lat.get("norm_cost_left")
        c.print(f"latency p50: original {lat['original']['p50_ms']:.4f} ms, optimized {lat['optimized']['p50_ms']:.4f} ms, "
                f"floor {lat['floor']['p50_ms']:.4f} ms -> speedup {lat['speedup']:.3f}x"
                + (f", normalization cost left {left:.0%}" if left is not None else "")
                + f"  [{lat['machine']['machine']}, {lat['threads']} threads, onnxruntime {lat['machine']['onnxruntime']}]")
    for n in r["notes"]:
        c.print(f"note: {n}")
    prec = (r.get("precision") or {}).get("accuracy")
    if prec:
        origin = (prec.get("origin") or {}).get("node")
        c.print(f"{r['target']} precision: max rel err {prec['max_rel_err']:.3g} against the fp32 lowering"
                + (f", largest error arises at {origin}" if origin else ""))
    c.print(f"wrote {path}")


@main.command(epilog=EXAMPLE)
@click.argument("model", type=click.Path(dir_okay=False))
@_common
def inspect(model, inputs, target, opset, trust_pickle, allow_approx, preln_form, as_json, debug):
    """List every normalization in MODEL, its kind, and which rewrite applies or why none does."""
    from . import pipeline

    with _errors(debug):
        opts = Options(target=target, inputs=inputs, trust_pickle=trust_pickle, opset=opset, allow_approx=allow_approx,
                       preln_form=preln_form)
        with _Progress(not as_json) as progress:
            info = pipeline.inspect_model(model, opts, progress)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{model}: {len(info['normalizations'])} normalization(s), target {target}")
        for col in ("node", "kind", "op", "what happens"):
            t.add_column(col, overflow="fold")
        for e in info["normalizations"]:
            fate = "; ".join(e["rewrites"]) if e["rewrites"] else "kept: " + "; ".join(e["kept_because"])
            t.add_row(e["node"], e["kind"], e["op"], fate)
        Console().print(t)


from .cli_bench import bench, gate  # noqa: E402

main.add_command(bench)
main.add_command(gate)


if __name__ == "__main__":
    main()
