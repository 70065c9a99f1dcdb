"""The Python API: what the command line does, as functions.

::

    import normdeploy

    result = normdeploy.optimize("models/digits_cnn_bn_un.pt", data="models/digits_test.npz", bench=False)
    result.report["norm_nodes"]          # {'before': {'BatchNorm': 1, 'UnifiedNorm': 1}, 'after': {}}
    result.save("out", force=True)       # model.onnx, original.onnx, report.json, report.md, triton/

``model`` is a path (``.onnx``, TorchScript ``.pt``, ``torch.export`` ``.pt2``, a
``torch.save``'d ``nn.Module``), an ``nn.Module`` (give ``inputs=("x:1x3x224x224",)`` or
set ``example_inputs`` on it), an ``ExportedProgram`` or an ``onnx.ModelProto``. Options
are the fields of :mod:`normdeploy.options`, given flat (``data=...``, ``seconds=1``,
``preln_form="crmsnorm"``) or as whole groups (``rewrite=RewriteOptions(...)``), or as
one :class:`~normdeploy.options.Options` (``options=...``); each default lives there once.
"""
from __future__ import annotations

from . import pipeline
from .options import Options


def _options(options: Options | None, target: str | None, values: dict) -> Options:
    if target is not None:
        values = {"target": target, **values}
    return Options.from_flat(options, **values)


def optimize(model, target: str | None = None, *, options: Options | None = None, progress=None,
             **values) -> pipeline.Result:
    """Export, canonicalize, rewrite, lower, build, verify and (unless ``bench=False``) time ``model``.

    With ``autotune=True`` (ort-* targets) the exact lowering and session variants are timed here first and
    the fastest kept (:mod:`normdeploy.autotune`; the report's ``autotune`` says what and by how much).
    Returns a :class:`~normdeploy.pipeline.Result`: ``.report`` (what report.json holds),
    ``.optimized`` / ``.original`` (ONNX models), ``.plan`` (a TensorRT engine) and
    ``.save(out)``. Raises :class:`~normdeploy.core.errors.NormdeployError` subclasses with a
    one-line message for bad input (2), unsupported models (3), accuracy above tolerance (4).
    """
    opts = _options(options, target, values)
    if opts.tune.autotune:  # ort-*: the lowering and session choices measured here (normdeploy.autotune)
        from . import autotune

        return autotune.optimize(model, opts, progress or pipeline._noop)
    return pipeline.optimize(model, opts, progress or pipeline._noop)


def inspect(model, target: str | None = None, *, options: Options | None = None, progress=None, **values) -> dict:
    """Every normalization in ``model``, its kind, how it was recognized, and what happens to it on ``target``."""
    return pipeline.inspect(model, _options(options, target, values), progress or pipeline._noop)


def benchmark(model, target: str | None = None, *, candidates: dict | None = None, peers: tuple[str, ...] = (),
              options: Options | None = None, progress=None, hint: str | None = None, **values):
    """Original, optimized (or ``candidates``), floor and ``peers`` timed in one interleaved run.

    Returns a :class:`normdeploy.bench.ModelBench` (``.speedup(name)``, ``.speedup_ci(name)``,
    ``.to_json()``); :func:`normdeploy.bench.markdown` and :mod:`normdeploy.bench.plot` render it.
    """
    return pipeline.measure(model, _options(options, target, values), candidates=candidates, peers=tuple(peers),
                            progress=progress or pipeline._noop, hint=hint)
