"""The corpus harness (issue 12): modules written as the papers' and libraries' code writes them,
exported the three ways users export, through ``optimize``, compared with eager torch.

Ways (:data:`WAYS`):

* ``dynamo``: ``torch.onnx.export(m, args, dynamo=True)`` to an ``.onnx`` file (what a user
  running torch's recommended exporter hands normdeploy);
* ``torchscript``: ``torch.onnx.export(m, args, dynamo=False)`` to an ``.onnx`` file;
* ``pt2``: ``torch.export.export`` then ``torch.export.save`` to a ``.pt2`` file, which
  normdeploy exports itself.

:func:`check` runs one file through :func:`normdeploy.optimize` and asserts what issue 12's
"done when" says: the normalization is counted before (by kind), gone or in its lowered form
after, and the optimized model's outputs are within ``tol`` relative (``max |opt - ref| /
max |ref|``, per output) of the eager torch module's on inputs the pipeline never saw.
"""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np

WAYS = ("dynamo", "torchscript", "pt2")
#: (way, opset) pairs a corpus module is exported in: every way at both ends of the opsets issue 12 names
#: (17, the first with LayerNormalization, and 23); a ``.pt2`` is exported by normdeploy at that opset
EXPORTS = [(w, o) for w in WAYS for o in (17, 23)]
#: what each way writes
SUFFIX = {"dynamo": ".onnx", "torchscript": ".onnx", "pt2": ".pt2"}

logging.getLogger("torch.onnx").setLevel(logging.ERROR)
logging.getLogger("onnxscript").setLevel(logging.ERROR)


def export(module, args: tuple, way: str, directory: str, opset: int = 20, dynamic_batch: bool = True,
           name: str = "model") -> str:
    """Write ``module`` (put in eval mode) exported ``way`` to ``directory``; returns the file's path.

    ``args`` are the example inputs (tensors); with ``dynamic_batch`` their first axis is dynamic.
    """
    import torch

    module = module.eval()
    path = os.path.join(directory, name + SUFFIX[way])
    names = [f"input_{i}" for i in range(len(args))] if len(args) > 1 else ["input"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if way == "dynamo":
            shapes = ({0: torch.export.Dim("batch", min=1, max=1024)} if dynamic_batch else None,) * len(args)
            torch.onnx.export(module, args, path, dynamo=True, opset_version=opset, input_names=names, verbose=False,
                              dynamic_shapes=shapes if dynamic_batch else None, optimize=False)
        elif way == "torchscript":
            axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
            torch.onnx.export(module, args, path, dynamo=False, opset_version=opset, input_names=names,
                              dynamic_axes=axes)
        elif way == "pt2":
            shapes = tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in args) if dynamic_batch else None
            ep = torch.export.export(module, args, dynamic_shapes=shapes)
            torch.export.save(ep, path)
        else:
            raise ValueError(f"unknown way {way!r}; one of {WAYS}")
    return path


def torch_outputs(module, arrays: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module.eval()(*[torch.from_numpy(a) for a in arrays])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() if o.dtype.is_floating_point else o.numpy() for o in outs]


def max_rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert ref.shape == got.shape, f"shape {got.shape} != {ref.shape}"
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    err = np.max(np.abs(ref - got)) if ref.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


def random_inputs(args: tuple, seed: int, batch: int | None = None) -> list[np.ndarray]:
    """Inputs shaped like ``args`` (first axis ``batch`` if given), fresh per seed: floats normal(0.3, 1.5),
    integers (token ids) uniform below the example's largest value + 1, never negative."""
    rng = np.random.default_rng(1000 + seed)
    out = []
    for a in args:
        shape = tuple(a.shape) if batch is None else (batch, *tuple(a.shape)[1:])
        dtype = np.dtype(str(a.dtype).replace("torch.", ""))
        if np.issubdtype(dtype, np.integer):
            out.append(rng.integers(0, int(a.max()) + 1, shape).astype(dtype))
        else:
            out.append((rng.normal(0.3, 1.5, shape)).astype(dtype))
    return out


def check(module, args: tuple, way: str, tmp_path, *, before: dict[str, int], after: dict[str, int] | None = None,
          target: str = "ort-cpu", opset: int = 20, tol: float = 1e-5, batches=(None, 3), **options):
    """Export ``module`` ``way``, optimize it for ``target`` (``--no-bench``), and assert what issue 12 asks.

    ``before``: the counts by kind ``report["norm_nodes"]["before"]`` must equal; ``after``: the
    counts that must remain (default: none). Either may instead map each way to its counts, for
    spellings an exporter changes itself (TorchScript's exporter folds an eval BatchNorm into the
    Conv before normdeploy sees it). For ``ort-cpu``/``ort-*`` the optimized model is run on ONNX Runtime and
    compared with eager torch on fresh inputs (the example batch and batch 3); for ``trt-*``
    (``lower_only``) the caller inspects ``result.optimized``. Returns the :class:`Result`.
    """
    import normdeploy
    from tests.conftest import ort_run

    path = export(module, args, way, str(tmp_path), opset=opset, dynamic_batch=any(b is not None for b in batches))
    options.setdefault("bench", False)
    if way == "pt2":  # a .pt2 has no opset of its own: normdeploy's export writes it at this one
        options.setdefault("opset", opset)
    if target.startswith("trt-"):
        options.setdefault("lower_only", True)
    result = normdeploy.optimize(path, target=target, **options)
    counts = result.report["norm_nodes"]
    before = before[way] if set(before) <= set(WAYS) and before else before
    after = after[way] if after and set(after) <= set(WAYS) else after
    assert counts["before"] == before, f"{way}: norms before {counts['before']}, want {before}"
    want_after = {} if after is None else after
    assert counts["after"] == want_after, f"{way}: norms after {counts['after']}, want {want_after}"
    if target.startswith("ort-"):
        for seed, batch in enumerate(batches):
            feeds = random_inputs(args, seed, batch)
            ref = torch_outputs(module, feeds)
            got = ort_run(result.optimized_model, *feeds)
            assert len(got) == len(ref)
            for r, g in zip(ref, got):
                err = max_rel_err(r, g)
                assert err <= tol, f"{way}: optimized vs torch max rel err {err:.3g} > {tol:g} (batch {batch})"
    return result
