"""Pieces every ``normdeploy`` command shares: one-line errors, the progress display, common options.

Errors a user can cause print one line (``error: what is wrong; what to do``) on stderr
and exit non-zero, with no traceback unless ``--debug``; see :mod:`normdeploy.errors`.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import click

from .errors import NormdeployError
from .pipeline import CLI_TARGETS


@contextmanager
def _errors(debug: bool):
    try:
        yield
    except NormdeployError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, then the hint
        if debug:
            raise
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        click.echo(f"error: internal error ({type(e).__name__}: {msg}); rerun with --debug and report it", err=True)
        sys.exit(1)


class _Progress:
    """A rich progress display on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None
        self._task = None
        self._stage = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def __call__(self, stage: str, fraction: float | None = None) -> None:
        if not self._progress:
            return
        if stage != self._stage:
            if self._task is not None:
                self._progress.update(self._task, completed=100, total=100)
            self._task = self._progress.add_task(stage, total=100 if fraction is not None else None)
            self._stage = stage
        if fraction is not None:
            self._progress.update(self._task, completed=100 * fraction, total=100)

    def __exit__(self, *exc):
        if self._progress:
            self._progress.__exit__(*exc)


def _common(f):
    opts = [
        click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE[:DTYPE]",
                     help="Input shape, e.g. input:1x3x224x224 or input_ids:1x128:int64; repeatable. "
                          "Default: read from the model."),
        click.option("--target", type=click.Choice(CLI_TARGETS), default="ort-cpu", show_default=True,
                     help="What to deploy to; auto = trt-fp16 where TensorRT and a GPU are present, else ort-cpu."),
        click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset for torch exports."),
        click.option("--trust-pickle", is_flag=True,
                     help="Unpickle torch files that reference classes outside torch.nn and normdeploy "
                          "(unpickling runs code: only for files you trust)."),
        click.option("--allow-approx", is_flag=True, help="Also run approximate rewrites (need calibration data)."),
        click.option("--preln-form", type=click.Choice(["rmsnorm", "crmsnorm"]), default="rmsnorm", show_default=True,
                     help="What the LayerNorms of a pre-LN residual stream become (both exact)."),
        click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f
