"""`normdeploy inspect` names every normalization's kind and says what happens to it."""
import json

import pytest
import torch

from normdeploy import nn as N


class HandRMSNorm(torch.nn.Module):
    """Llama-style RMSNorm written by hand with torch.rsqrt."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class Zoo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.un = N.UnifiedNorm(8)
        self.proj = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.rms = torch.nn.RMSNorm(16, eps=1e-6)
        self.hand = HandRMSNorm(16)
        self.pn = N.PowerNorm(16, groups=4)
        self.dyt = N.DynamicTanh(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.un(self.bn(self.conv(x))))  # [N, 8, 8, 8]
        t = self.proj(h.flatten(2).transpose(1, 2))  # [N, 64, 16]
        t = torch.relu(self.ln(t))
        t = torch.relu(self.rms(t))
        t = torch.relu(self.hand(t))
        t = torch.relu(self.pn(t))
        return self.head(self.dyt(t)).mean(1)


@pytest.mark.slow
def test_inspect_names_every_kind(cli, tmp_path):
    p = tmp_path / "zoo.pt"
    torch.save(Zoo().eval(), p)
    r = cli("inspect", p, "--input", "1x1x8x8", "--json", "--trust-pickle")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    kinds = {e["node"]: e["kind"] for e in info["normalizations"]}
    assert kinds == {"bn": "BatchNorm", "un": "UnifiedNorm", "ln": "LayerNorm", "rms": "RMSNorm",
                     "hand": "RMSNorm", "pn": "PowerNorm", "dyt": "DynamicTanh"}, kinds
    by_node = {e["node"]: e for e in info["normalizations"]}
    assert any("folded into Conv" in w for w in by_node["bn"]["rewrites"])
    assert by_node["hand"]["recognized"], "the hand-written RMSNorm must be recognized by a canonicalize pass"
    for e in info["normalizations"]:
        assert e["rewrites"] or e["kept_because"]
    r = cli("inspect", p, "--input", "1x1x8x8", "--trust-pickle")
    assert r.exit_code == 0 and "UnifiedNorm" in r.stdout and "PowerNorm" in r.stdout


class NoRootNorm(torch.nn.Module):
    """x / (mean(x^2) + eps): a mean of squares with no square root (no normalization a recognizer knows)."""

    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-6)


class VectorAlphaTanh(torch.nn.Module):
    """DyT-like, but alpha is a vector (DyT's alpha is one scalar)."""

    def __init__(self, d):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x)


class Leftovers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.hand = HandRMSNorm(16)
        self.noroot = NoRootNorm()
        self.tanh = VectorAlphaTanh(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.tanh(self.noroot(self.hand(self.proj(x)))))


@pytest.mark.slow
def test_inspect_lists_spellings_and_what_it_left_alone(cli, tmp_path):
    p = tmp_path / "left.pt"
    torch.save(Leftovers().eval(), p)
    r = cli("inspect", p, "--input", "1x4x16", "--json", "--trust-pickle")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    (hand,) = info["normalizations"]
    assert hand["node"] == "hand" and hand["kind"] == "RMSNorm" and hand["recognized_by"] == "recognize_rmsnorm"
    assert "Pow ReduceMean Add Sqrt" in hand["spelling"] and "Mul" in hand["spelling"], hand["spelling"]
    left = {x["what"]: x for x in info["left_alone"]}
    assert set(left) == {"mean of squares", "tanh of a scaled input"}, info["left_alone"]
    ms = left["mean of squares"]
    assert ms["node"].startswith("noroot/") and ms["spelling"] == "Pow ReduceMean"
    assert "square root" in ms["reason"] and ms["node"] in ms["reason"], ms["reason"]
    th = left["tanh of a scaled input"]
    assert "not by one scalar alpha" in th["reason"] and th["spelling"] == "Mul Tanh Mul", th
    assert any(s.startswith("recognize_dyt: ") for s in th["recognizers"]), th
    r = cli("inspect", p, "--input", "1x4x16", "--trust-pickle")
    assert r.exit_code == 0 and "subgraph(s) left alone" in r.stdout and "condition" in r.stdout, r.stdout


class Bf16Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.hand = HandRMSNorm(16)

    def forward(self, x):
        return self.hand(torch.relu(self.ln(self.proj(x))))


@pytest.mark.slow
def test_inspect_a_bf16_model(cli, tmp_path):
    p = tmp_path / "bf16.pt"
    torch.save(Bf16Net().to(torch.bfloat16).eval(), p)
    r = cli("inspect", p, "--input", "x:1x4x16:bfloat16", "--json", "--trust-pickle")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["inputs"] == [{"name": "x", "shape": [1, 4, 16], "dtype": "bfloat16"}]
    kinds = {e["node"]: e["kind"] for e in info["normalizations"]}
    assert kinds == {"ln": "LayerNorm", "hand": "RMSNorm"}, kinds
    by_node = {e["node"]: e for e in info["normalizations"]}
    assert by_node["hand"]["recognized_by"] == "recognize_rmsnorm"
    r = cli("inspect", p, "--input", "x:1x4x16:bfloat16", "--trust-pickle")
    assert r.exit_code == 0 and "RMSNorm" in r.stdout
