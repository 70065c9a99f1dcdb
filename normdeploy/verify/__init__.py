"""Stage ``verify``: does the optimized model compute what the original computed?

Both models run on the same inputs (seeded random ones, plus the user's real data when
given) and every output is compared, Polygraphy-style: each comparison carries its
tolerances and names the output that failed.

Metrics, per output and then the worst over outputs:

* ``max_abs_err``  = max |opt - ref|
* ``max_rel_err``  = max |opt - ref| / max |ref|  (relative to the output's range, so that
  entries near zero do not make it meaningless)
* ``cosine_min``   = the smallest cosine similarity between a sample's ``opt`` and ``ref``
  (flattened per sample, over the batch axis; a 0-d output is one sample of one entry, its
  cosine the agreement of signs)
* ``top1_agreement`` for outputs shaped ``[N, K]`` with K > 1 (classifiers)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..build import Runner
from ..core.errors import AccuracyError, InputError
from ..core.inputs import InputSpec, example_arrays


@dataclass
class OutputComparison:
    name: str
    max_abs_err: float
    max_rel_err: float
    cosine_min: float
    top1_agreement: float | None = None
    nonfinite: int = 0


@dataclass
class Accuracy:
    inputs: str  # what the inputs were
    samples: int
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)

    @property
    def cosine_min(self) -> float:
        return min((o.cosine_min for o in self.outputs), default=1.0)

    @property
    def top1_agreement(self) -> float | None:
        vals = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(vals) if vals else None

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "samples": self.samples, "max_abs_err": self.max_abs_err,
                "max_rel_err": self.max_rel_err, "cosine_min": self.cosine_min,
                "top1_agreement": self.top1_agreement, "outputs": [o.__dict__ for o in self.outputs]}


#: a comparison converts at most this many entries of an output to float64 at a time
CHUNK_ENTRIES = 1 << 20


@dataclass
class _Tally:
    """The parts of :class:`OutputComparison` that combine over batches of samples and over blocks of
    entries (max, min, sums), so that a comparison never holds more than :data:`CHUNK_ENTRIES` entries of
    an output in float64 (an LM's logits are large: 78 MB of float32 per Qwen2 feed, five times that in
    the float64 temporaries of a whole-array comparison). ``ref`` and ``opt`` may be memory-mapped
    (:class:`normdeploy.build.Recorded`): they are read block by block, never copied whole.

    Per sample (row ``i`` of the output flattened to ``[rows, cols]``) the cosine is
    ``sum(r*o) / sqrt(sum(r*r) * sum(o*o))``, its three sums accumulated over column blocks in
    float64 (what ``np.linalg.norm`` computes, in another summation order: equal to about 1e-16).
    Max, min and counts are order-free, so exact. Top-1 is ``argmax`` over whole rows of the arrays
    as given (argmax is the same in any float dtype that holds the values exactly)."""

    name: str
    max_abs: float = 0.0
    scale: float = 0.0
    same_nonfinite: bool = True
    nonfinite: int = 0
    cosine_min: float = 1.0
    top1_hits: int = 0
    top1_rows: int = 0

    def add(self, ref: np.ndarray, opt: np.ndarray) -> None:
        ref, opt = np.asarray(ref), np.asarray(opt)
        if ref.shape != opt.shape:
            raise ValueError(f"output {self.name}: shape {opt.shape} differs from the original's {ref.shape}")
        rows = ref.shape[0] if ref.ndim else 1
        if rows == 0:
            return
        r2d, o2d = ref.reshape(rows, -1), opt.reshape(rows, -1)
        cols = r2d.shape[1]
        dot, rr, oo = np.zeros(rows), np.zeros(rows), np.zeros(rows)
        row_step = max(1, CHUNK_ENTRIES // max(cols, 1))
        col_step = min(max(cols, 1), CHUNK_ENTRIES)
        for i in range(0, rows, row_step):
            for j in range(0, cols, col_step):
                blk = (slice(i, i + row_step), slice(j, j + col_step))
                d, rr_b, oo_b = self._block(np.asarray(r2d[blk], np.float64), np.asarray(o2d[blk], np.float64))
                dot[blk[0]] += d
                rr[blk[0]] += rr_b
                oo[blk[0]] += oo_b
        nr, no = np.sqrt(rr), np.sqrt(oo)
        cos = np.where((nr == 0) & (no == 0), 1.0, dot / np.maximum(nr * no, 1e-300))
        self.cosine_min = min(self.cosine_min, float(cos.min()))
        if ref.ndim == 2 and ref.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating):
            for i in range(0, rows, row_step):
                self.top1_hits += int(np.sum(ref[i:i + row_step].argmax(1) == opt[i:i + row_step].argmax(1)))
            self.top1_rows += rows

    def _block(self, ref64: np.ndarray, opt64: np.ndarray):
        """Fold one float64 block into the running max, min and counts; its per-row sums for the cosine."""
        ref_finite, opt_finite = np.isfinite(ref64), np.isfinite(opt64)
        self.nonfinite += int(np.sum(~opt_finite & ref_finite))  # non-finite where the original is finite
        both = ref_finite & opt_finite
        del ref_finite, opt_finite
        self.same_nonfinite &= bool(np.array_equal(np.isnan(ref64), np.isnan(opt64)) and np.array_equal(
            np.where(np.isinf(ref64), ref64, 0), np.where(np.isinf(opt64), opt64, 0)))
        r = np.where(both, ref64, 0.0)
        o = np.where(both, opt64, 0.0)
        del ref64, opt64, both
        if r.size:
            with np.errstate(over="ignore"):  # a difference of two large finite values may overflow: inf, as it is
                self.max_abs = max(self.max_abs, float(np.abs(o - r).max()))
            self.scale = max(self.scale, float(np.abs(r).max()))
        with np.errstate(over="ignore"):
            return (r * o).sum(1), (r * r).sum(1), (o * o).sum(1)

    def result(self) -> OutputComparison:
        max_abs = self.max_abs if self.same_nonfinite else float("inf")
        max_rel = max_abs / self.scale if self.scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        top1 = self.top1_hits / self.top1_rows if self.top1_rows else None
        return OutputComparison(self.name, max_abs, max_rel, self.cosine_min, top1, max(self.nonfinite, 0))


def compare_arrays(name: str, ref: np.ndarray, opt: np.ndarray) -> OutputComparison:
    """Every metric of the module docstring for one output (``ref`` the original's, ``opt`` the optimized's)."""
    tally = _Tally(name)
    tally.add(ref, opt)
    return tally.result()


def compare(original: Runner, optimized: Runner, feeds: list[dict[str, np.ndarray]], label: str) -> Accuracy:
    """Run both models on every feed; compare output by output (outputs matched by position), feed by feed.

    Streaming: one feed's outputs of each model are alive at a time (a :class:`normdeploy.build.Recorded`
    original replays them memory-mapped), and each is compared block by block (:class:`_Tally`)."""
    tallies: dict[int, _Tally] = {}
    samples = 0
    for feed in feeds:
        ref, opt = original.run(feed), optimized.run(feed)
        samples += next(iter(feed.values())).shape[0] if feed else 1
        for i, (r, o) in enumerate(zip(ref, opt)):
            tallies.setdefault(i, _Tally(original.output_names[i])).add(r, o)
        ref = opt = r = o = None  # before the next feed's outputs exist: one set alive at a time
    acc = Accuracy(label, samples)
    acc.outputs.extend(t.result() for t in tallies.values())
    return acc


def batches(data: dict[str, np.ndarray], batch: int, drop_last: bool = False) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(data.values())))
    stop = n - n % batch if drop_last else n
    return [{k: v[i:i + batch] for k, v in data.items()} for i in range(0, stop, batch)]


# ----------------------------------------------------------------------------- input sets

RANDOM_SEEDS = range(4)


def random_feeds(specs: list[InputSpec], batch: int) -> list[dict[str, np.ndarray]]:
    """The seeded random inputs every comparison uses: N(0, 1) floats, seeds 0-3, at least 4 samples each."""
    return [example_arrays(specs, seed=s, batch=max(batch, 4)) for s in RANDOM_SEEDS]


def load_data(path: str, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """An ``.npz`` of real inputs, one array per model input (a lone array serves a lone input)."""
    try:
        npz = np.load(path)
    except FileNotFoundError:
        raise InputError(f"data file {path} does not exist", "check the --data path") from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"data file {path} is not a readable .npz ({type(e).__name__})",
                         "save inputs with numpy.savez(path, input_name=array)") from None
    arrays = {k: npz[k] for k in npz.files if k not in ("label", "labels")}
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"data file {path} has no array for input(s) {', '.join(missing)}",
                         f"its arrays are {', '.join(npz.files)}; name them after the model inputs")
    out = {}
    for s in specs:
        a = arrays[s.name]
        if a.ndim != len(s.shape) or tuple(a.shape[1:]) != tuple(s.shape[1:]):
            raise InputError(f"data for input {s.name} has shape {a.shape}, the model takes "
                             f"[N, {', '.join(map(str, s.shape[1:]))}]", "fix the data file or --input")
        out[s.name] = a.astype(np.dtype(a.dtype) if s.dtype not in ("float32",) else np.float32)
        if np.issubdtype(out[s.name].dtype, np.floating) and not np.isfinite(out[s.name]).all():
            bad = int(np.size(out[s.name]) - np.isfinite(out[s.name]).sum())
            raise InputError(f"data for input {s.name} has {bad} NaN or Inf value(s) of {out[s.name].size}, so no "
                             "error could be measured on them", "give finite inputs in the data file")
    return out


def data_feeds(path: str, specs: list[InputSpec]) -> list[dict[str, np.ndarray]]:
    """``--data`` in batches: of 64 rows, or of the model's fixed batch (an incomplete last one dropped)."""
    data = load_data(path, specs)
    static = any(0 not in s.dynamic for s in specs)
    chunks = batches(data, specs[0].shape[0] if static else 64, drop_last=static)
    if not chunks:
        raise InputError(f"data file {path} has fewer rows than the model's fixed batch {specs[0].shape[0]}",
                         "give at least one full batch")
    return chunks


def input_sets(specs: list[InputSpec], batch: int, data: str | None = None,
               calib: tuple[str, list] | None = None, label: str = "") -> dict[str, tuple[list, str]]:
    """Every set of inputs a comparison runs on: key -> (feeds, what they are).

    ``random`` always; ``calib`` (path, feeds) when approximate rewrites were calibrated;
    ``data`` when the user gave real inputs.
    """
    sets = {"random": (random_feeds(specs, batch), f"random N(0,1), seeds 0-3{label}")}
    if calib is not None:
        sets["calib"] = (calib[1], f"calibration file {calib[0]}")
    if data:
        sets["data"] = (data_feeds(data, specs), f"data file {data}{label}")
    return sets


# ----------------------------------------------------------------------------- judging

def worst(accuracies) -> dict:
    """The worst of every metric over several :class:`Accuracy` (input sets): the figures a report quotes."""
    accs = list(accuracies)
    top1 = [a.top1_agreement for a in accs if a.top1_agreement is not None]
    return {"max_abs_err": max(a.max_abs_err for a in accs), "max_rel_err": max(a.max_rel_err for a in accs),
            "cosine_min": min(a.cosine_min for a in accs), "top1_agreement": min(top1) if top1 else None}


def check_tolerance(accuracies, tolerance: float, hint: str) -> None:
    """Refuse (AccuracyError, naming the output) when any output's max relative error exceeds ``tolerance``."""
    accs = list(accuracies)
    bad = max((o for a in accs for o in a.outputs), key=lambda o: o.max_rel_err, default=None)
    if bad is not None and bad.max_rel_err > tolerance:
        raise AccuracyError(f"optimized model differs from the original: output {bad.name} max relative error "
                            f"{bad.max_rel_err:.3g} > tolerance {tolerance:g}", hint)
