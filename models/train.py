"""Train the normdeploy model zoo and record what each checkpoint reached.

    .venv/bin/python models/train.py              # every model (about a minute on one core)
    .venv/bin/python models/train.py vit_dyt snn  # only these; other zoo.json entries are kept
    .venv/bin/python models/train.py --list

Image models train on scikit-learn's digits (1797 8x8 images; fixed stratified split
``train_test_split(test_size=0.2, random_state=0, stratify=y)``: 1437 train, 360 test;
pixels scaled to [0, 1], float32 [N, 1, 8, 8]). The decoder trains on a synthetic copy
task (see :func:`copy_task`). Every run is seeded and single-threaded, so it reproduces
on the same machine and torch version; the test split is never used for training or
model selection (fixed epoch counts, last epoch kept).

Outputs, next to this script:

* ``<name>.pt``: ``torch.save(model.eval())``, the whole module (loads weights-only with
  normdeploy's allow-list: ``normdeploy.load.load(path)``);
* ``digits_test.npz`` ({"input": float32 [360, 1, 8, 8], "label": int64 [360]}) and
  ``seq_test.npz`` ({"input_ids": int64 [N, 16], "label": int64 [N, 16], -100 = unscored});
* ``zoo.json``: per model its file, architecture, normalization modules, parameters,
  eval-mode test accuracy, train seconds, seed and training settings.

Accuracy is measured in eval mode (running statistics, the behaviour that is exported).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from normdeploy import zoo  # noqa: E402
from normdeploy.nn import GroupScaling, NORM_MODULES  # noqa: E402

SEED = 0
DIGITS_TEST = os.path.join(HERE, "digits_test.npz")
SEQ_TEST = os.path.join(HERE, "seq_test.npz")
ZOO_JSON = os.path.join(HERE, "zoo.json")
IGNORE = -100

# copy task: 8 random tokens, then the same 8 again; positions 7..14 predict the copy
SEQ_VOCAB, SEQ_HALF = 32, 8


# ----------------------------------------------------------------------------- data

def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed digits split: X float32 [N, 1, 8, 8] in [0, 1], y int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def copy_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of 16 tokens: 8 uniform tokens from [0, 32) followed by the same 8.

    Labels are next-token targets where the next token is determined (positions 7..14
    predict the copied half), ``-100`` elsewhere. Chance accuracy is 1/32.
    """
    first = torch.randint(0, SEQ_VOCAB, (n, SEQ_HALF), generator=generator)
    ids = torch.cat([first, first], dim=1)
    label = torch.full_like(ids, IGNORE)
    label[:, SEQ_HALF - 1:-1] = ids[:, SEQ_HALF:]
    return ids, label


# ----------------------------------------------------------------------------- the zoo

def _vit(norm: str):
    return lambda: zoo.ViTTiny(norm)


#: name -> (builder, task, settings). Settings: epochs (digits) or steps (sequence), lr, batch.
MODELS: dict[str, tuple] = {
    "digits_cnn_bn_un": (zoo.DigitsCNN, "digits", {"epochs": 8, "lr": 3e-3}),
    "resnet_bn": (zoo.ResNetDigits, "digits", {"epochs": 8, "lr": 3e-3}),
    "mobilenet_bn": (zoo.MobileNetDigits, "digits", {"epochs": 15, "lr": 3e-3}),
    **{f"vit_{n}": (_vit(n), "digits", {"epochs": 30, "lr": 2e-3}) for n in zoo.VIT_NORMS},
    "llama_rmsnorm": (zoo.LlamaDecoder, "sequence", {"steps": 600, "lr": 3e-3}),
    "snn_lif_mpbn": (zoo.SpikingCNN, "digits", {"epochs": 10, "lr": 3e-3}),
}


def norm_kinds(model: nn.Module) -> dict[str, int]:
    """Normalization modules by class name (GroupScaling inside a PowerNorm and BN inside a LIF not counted)."""
    count: collections.Counter = collections.Counter()
    inner = set()
    for m in model.modules():
        if isinstance(m, zoo.LIFNeuron) and m.bn is not None:
            inner.add(id(m.bn))
        if isinstance(m, zoo.PowerNorm):
            inner.add(id(m.scaling))
    for m in model.modules():
        if id(m) in inner:
            continue
        if isinstance(m, NORM_MODULES + (GroupScaling, nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)):
            count[type(m).__name__] += 1
    return dict(sorted(count.items()))


def architecture(model: nn.Module) -> str:
    name = type(model).__name__
    if isinstance(model, zoo.ViTTiny):
        return f"{name}(norm={model.norm_kind!r})"
    return f"{name}()"


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate(model: nn.Module, task: str) -> tuple[int, int]:
    """(correct, total) of the eval-mode model on the held-out split."""
    model.eval()
    if task == "digits":
        d = np.load(DIGITS_TEST)
        pred = model(torch.from_numpy(d["input"])).argmax(-1).numpy()
        return int((pred == d["label"]).sum()), int(d["label"].size)
    d = np.load(SEQ_TEST)
    pred = model(torch.from_numpy(d["input_ids"])).argmax(-1).numpy()
    scored = d["label"] != IGNORE
    return int((pred[scored] == d["label"][scored]).sum()), int(scored.sum())


def train_digits(model: nn.Module, epochs: int, lr: float, batch: int = 64) -> None:
    xtr, ytr, _, _ = digits_split()
    xtr, ytr = torch.from_numpy(xtr), torch.from_numpy(ytr)
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def train_sequence(model: nn.Module, steps: int, lr: float, batch: int = 64) -> None:
    g = torch.Generator().manual_seed(SEED + 1)  # the test split uses SEED, see write_test_sets
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        ids, label = copy_task(batch, g)
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), label.reshape(-1),
                                           ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def write_test_sets() -> None:
    _, _, xte, yte = digits_split()
    np.savez(DIGITS_TEST, input=xte, label=yte)
    ids, label = copy_task(1000, torch.Generator().manual_seed(SEED))
    np.savez(SEQ_TEST, input_ids=ids.numpy(), label=label.numpy())


def train_one(name: str, out_dir: str = HERE) -> dict:
    """Train ``name`` with its fixed seed and settings, save ``<out_dir>/<name>.pt``, return its zoo.json entry."""
    builder, task, settings = MODELS[name]
    torch.manual_seed(SEED)
    model = builder()
    t0 = time.perf_counter()
    if task == "digits":
        train_digits(model, settings["epochs"], settings["lr"])
    else:
        train_sequence(model, settings["steps"], settings["lr"])
    seconds = time.perf_counter() - t0
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.pt")
    torch.save(model, path)
    correct, total = evaluate(model, task)
    return {
        "file": os.path.basename(path),
        "architecture": architecture(model),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "norm_kinds": norm_kinds(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": os.path.getsize(path),
        "task": "sklearn digits" if task == "digits" else "copy task (8 tokens, vocab 32, repeated)",
        "test_set": os.path.basename(DIGITS_TEST if task == "digits" else SEQ_TEST),
        "test_accuracy": round(correct / total, 6),
        "test_correct": correct,
        "test_total": total,
        "chance_accuracy": 0.1 if task == "digits" else round(1 / SEQ_VOCAB, 6),
        "train_seconds": round(seconds, 2),
        "seed": SEED,
        "training": {"optimizer": "AdamW(weight_decay=1e-4), OneCycleLR", "batch": 64, **settings},
        "example_inputs": {k: list(v) for k, v in model.example_inputs.items()},
        "example_input_dtypes": dict(getattr(model, "example_input_dtypes", {})),
        "torch": torch.__version__,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"models to train (default: all): {', '.join(MODELS)}")
    ap.add_argument("--list", action="store_true", help="list the zoo and exit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs reproducible)")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_, task, settings) in MODELS.items():
            print(f"{name:20s} {task:9s} {settings}")
        return 0
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    write_test_sets()
    record = {}
    if os.path.exists(ZOO_JSON):
        with open(ZOO_JSON) as f:
            record = json.load(f)
    for name in args.names or list(MODELS):
        entry = train_one(name)
        record[name] = entry
        print(f"{name:20s} acc {entry['test_accuracy']:.4f} ({entry['test_correct']}/{entry['test_total']})  "
              f"{entry['parameters']:>7d} params  {entry['size_bytes'] / 1e6:.2f} MB  {entry['train_seconds']:.1f} s",
              flush=True)
        record = {k: record[k] for k in MODELS if k in record}  # zoo order
        with open(ZOO_JSON, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
