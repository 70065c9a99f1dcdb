"""The ``normdeploy`` command line: ``optimize``, ``inspect``, ``bench``, ``gate`` and ``serve``.

Every command is a thin layer over :mod:`normdeploy.api`; its flags come from
:mod:`normdeploy.options` (:mod:`.common`). Errors a user can cause print one line
(``error: what is wrong; what to do``) on stderr and exit non-zero, with no traceback
unless ``--debug``; see :mod:`normdeploy.core.errors`.
"""
from __future__ import annotations

import json
import os

import click

from ..package import TRITON_BACKENDS
from .bench import bench
from .common import OneLineGroup, Progress, SectionedCommand, common_flags, errors, group_options, options_from, plain
from .gate import gate
from .serve import serve

EXAMPLE = """
\b
Example:
  normdeploy optimize models/digits_cnn_bn_un.pt --data models/digits_test.npz --out out/
  normdeploy optimize model.onnx --input input_ids:1x128:int64 --target ort-cpu --out out/ --json
"""


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLE)
@click.version_option(package_name="normdeploy")
def main():
    """Fold, fuse or exactly replace the normalization layers of a model, then build and benchmark it."""


@main.command(cls=SectionedCommand, epilog=EXAMPLE)
@click.argument("model", type=click.Path())
@group_options("target", "export", "rewrite", "verify", "bench", "ort", "trt", "tune")
@plain("--out", "out", type=click.Path(file_okay=False), default=None, section="output",
       help="Output directory (default: <model name>.normdeploy in the current directory).")
@plain("--force", is_flag=True, section="output", help="Replace an existing non-empty output directory.")
@plain("--triton-repo", type=click.Path(file_okay=False), default=None, section="output",
       help="Also write the model into this Triton Inference Server model repository.")
@plain("--triton-backend", type=click.Choice(TRITON_BACKENDS), default="default", show_default=True,
       section="output", help="Backend of the Triton entry: default = ONNX Runtime (ort-*) or TensorRT (trt-* "
       "engines), as NGC's tritonserver images serve them; python = the ONNX model on ONNX Runtime in Triton's "
       "Python backend, which PyPI's tritonserver (nvidia-pytriton) serves on CPU (`normdeploy serve`).")
@common_flags
def optimize(model, out, force, triton_repo, triton_backend, as_json, debug, **values):
    """Optimize MODEL (.onnx, TorchScript .pt, torch.export .pt2, a torch.save'd nn.Module, or a Hugging Face
    model folder written by save_pretrained)."""
    from .. import api, package, pipeline
    from ..core.errors import InputError

    with errors(debug):
        opts = options_from(values)
        out = out or os.path.splitext(os.path.basename(os.path.abspath(model)))[0] + ".normdeploy"
        package.check_writable(out, force, inputs=(model,))
        pipeline.resolve_target(opts)  # a missing GPU or TensorRT is said before any work
        if triton_repo:
            if opts.trt.lower_only and triton_backend != "python":
                raise InputError("--triton-repo with --lower-only: the lowered model has TensorRT plugin nodes that "
                                 "no Triton backend serves", "build the engine on a GPU host (drop --lower-only), "
                                 "or pass --triton-backend python")
            package.check_repository(triton_repo, package.default_name(model), inputs=(model,))
        with Progress(not as_json) as progress:
            result = api.optimize(model, options=opts, progress=progress)
            progress("write", None)
            path = result.save(out, force=force, triton_repo=triton_repo, triton_backend=triton_backend)
        report = package.jsonable(result.report)
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
                + (f", normalization cost left {left:.0%}" if left is not None
                   else f", normalization cost left n/a ({lat.get('norm_cost_left_note')})")
                + f"  [{lat['machine']['machine']}, {lat['threads']} threads, onnxruntime {lat['machine']['onnxruntime']}]")
    tuned = r.get("autotune")
    if tuned:
        for cand in tuned["candidates"]:
            if cand["timed"] and cand["name"] != "default":
                ci = cand["speedup_ci95"]
                c.print(f"autotune: {cand['name']}: p50 {cand['p50_ms']:.4f} ms, {cand['speedup_vs_default']:.3f}x the "
                        "default" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (no interval)"))
    for n in r["notes"]:
        c.print(f"note: {n}")
    prec = (r.get("precision") or {}).get("accuracy")
    if prec:
        origin = (prec.get("origin") or {}).get("node")
        c.print(f"{r['target']} precision: max rel err {prec['max_rel_err']:.3g} against the fp32 lowering"
                + (f", largest error arises at {origin}" if origin else ""))
    c.print(f"wrote {path}")


@main.command(cls=SectionedCommand, epilog=EXAMPLE)
@click.argument("model", type=click.Path())
@group_options("target", "export", "rewrite", "ort", only={"target": ("target",), "ort": ("rms_op",)})
@common_flags
def inspect(model, as_json, debug, **values):
    """List every normalization in MODEL, its kind, and which rewrite applies or why none does."""
    from .. import api

    with errors(debug):
        opts = options_from(values)
        with Progress(not as_json) as progress:
            info = api.inspect(model, options=opts, progress=progress)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        t = Table(title=f"{model}: {len(info['normalizations'])} normalization(s), target {opts.target}")
        for col in ("node", "kind", "op", "spelling matched", "what happens"):
            t.add_column(col, overflow="fold")
        for e in info["normalizations"]:
            fate = "; ".join(e["rewrites"]) if e["rewrites"] else "kept: " + "; ".join(e["kept_because"])
            t.add_row(e["node"], e["kind"], e["op"], e["spelling"], fate)
        console.print(t)
        left = info.get("left_alone") or []
        if left:
            t = Table(title=f"{len(left)} normalization-like subgraph(s) left alone")
            for col in ("node", "what", "ops", "condition that failed", "then"):
                t.add_column(col, overflow="fold")
            for x in left:
                t.add_row(x["node"], x["what"], x["spelling"], x["reason"], "; ".join(x["fate"]) or "-")
            console.print(t)
        for n in info.get("notes") or []:
            console.print(f"note: {n}")


main.add_command(bench)
main.add_command(gate)
main.add_command(serve)


if __name__ == "__main__":
    main()
