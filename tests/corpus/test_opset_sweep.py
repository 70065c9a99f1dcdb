"""Every opset issue 12 names, 17 to 23, for one reference spelling of each normalization family.

The family tests (tests/canonicalize/test_*.py, tests/rewrite/test_affine_sources.py,
tests/rewrite/test_mpbn_reference.py) export every corpus module at both ends of the range, 17
and 23 (:data:`tests.corpus.harness.EXPORTS`). Between them the exporters change how they write
the same arithmetic: reductions take ``axes`` as an input from 18 (TorchScript's symbolic
functions and onnxscript's torchlib both switch), ``GroupNormalization`` appears at 18 and
changes its scale and bias shape at 21, the dynamo exporter converts its opset-18 graph up to
the requested one. This sweep runs the opsets in between, 18 to 22, each of the three ways, on
one module per family written as its reference implementation writes it (the module's
docstring names the repository and file). Each case is :func:`tests.corpus.harness.check`:
counted by kind before, removed or lowered after as the family test asserts, exact within 1e-5
relative against eager torch on fresh inputs, and the op types that must be gone are gone.
"""
from __future__ import annotations

import collections

import pytest
import torch

from tests.conftest import randomize
from tests.corpus import affine as affine_corpus
from tests.corpus import crmsnorm as crmsnorm_corpus
from tests.corpus import dyt as dyt_corpus
from tests.corpus import groupnorm as groupnorm_corpus
from tests.corpus import harness
from tests.corpus import layernorm as layernorm_corpus
from tests.corpus import mpbn as mpbn_corpus
from tests.corpus import powernorm as powernorm_corpus
from tests.corpus import rmsnorm as rmsnorm_corpus
from tests.corpus import scalenorm as scalenorm_corpus
from tests.corpus import unified_norm as un_corpus

OPSETS = (18, 19, 20, 21, 22)


def _random(factory, seed=7):
    def make():
        torch.manual_seed(0)
        return randomize(factory(), seed=seed)
    return make


def _corpus_randomized(module_corpus, factory, seed=1):
    """Modules whose corpus file brings its own randomizer (affine, GroupNorm, MPBN: buffers randomize() skips)."""
    def make():
        torch.manual_seed(0)
        return module_corpus.randomize_(factory(), seed)
    return make


#: case -> (module factory, example input shape, norms before by kind, norms after, op types gone after, ways);
#: the counts are the family tests' own (named in each comment); on ort-cpu CRMSNorm, ScaleNorm and DyT are
#: lowered to standard ops (their Sqrt / ReduceL2 / Tanh stay), so only the counts speak for them
CASES = {
    # test_layernorm.py::test_corpus_layernorm_spellings_become_layernormalization
    "LayerNorm via torch.var": (_random(lambda: layernorm_corpus.VarLayerNorm(16)), (2, 5, 16), {"LayerNorm": 1},
                                {"LayerNorm": 1}, {"ReduceMean", "Sqrt"}, harness.WAYS),
    # test_rmsnorm.py::test_corpus_rmsnorm_spellings
    "bzhang rms_norm (tensorflow)": (_random(lambda: rmsnorm_corpus.BzhangRMSNormTF(16)), (2, 5, 16),
                                     {"RMSNorm": 1}, {"RMSNorm": 1}, {"Sqrt"}, harness.WAYS),
    "timm RmsNorm2d": (_random(lambda: rmsnorm_corpus.TimmRmsNorm2d(8)), (2, 8, 4, 4), {"RMSNorm": 1},
                       {"RMSNorm": 1}, {"Sqrt"}, harness.WAYS),
    "HF T5LayerNorm": (_random(lambda: rmsnorm_corpus.hf_classes()["t5"](16)), (2, 5, 16), {"RMSNorm": 1},
                       {"RMSNorm": 1}, {"Sqrt"}, harness.WAYS),
    # test_crmsnorm.py::test_corpus_crmsnorm_is_recognized_and_exact
    "CRMSNorm (pre-rmsnorm-transformer)": (_random(lambda: crmsnorm_corpus.CRMSNorm(15, elementwise_affine=False)),
                                           (2, 5, 15), {"CRMSNorm": 1}, {}, set(), harness.WAYS),
    # test_dyt.py::test_corpus_dynamic_tanh
    "DynamicTanh channels_last": (_random(lambda: dyt_corpus.DynamicTanh(16, channels_last=True)), (2, 5, 16),
                                  {"DynamicTanh": 1}, {}, set(), harness.WAYS),
    "DynamicTanh channels_first": (_random(lambda: dyt_corpus.DynamicTanh(8, channels_last=False)), (2, 8, 4, 4),
                                   {"DynamicTanh": 1}, {}, set(), harness.WAYS),
    # test_unified_norm.py::test_corpus_un1d
    "UN1d (hikvision)": (_random(lambda: un_corpus.UN1d(16), seed=11), (2, 5, 16), {"UnifiedNorm": 1}, {},
                         {"Sqrt", "Div"}, harness.WAYS),
    # test_powernorm.py: GroupScaling1D and MaskPowerNorm (TorchScript's export of MaskPowerNorm fails in torch)
    "GroupScaling1D, 4 groups": (_random(lambda: powernorm_corpus.GroupScaling1D(group_num=4)), (5, 2, 16),
                                 {"GroupScaling": 1}, {}, set(), harness.WAYS),
    "MaskPowerNorm, 4 groups": (_random(lambda: powernorm_corpus.MaskPowerNorm(16, group_num=4)), (5, 2, 16),
                                {"PowerNorm": 1}, {}, set(), ("dynamo", "pt2")),
    # test_scalenorm.py::test_corpus_scalenorm
    "tnq177 ScaleNorm": (_random(lambda: scalenorm_corpus.ScaleNorm(16 ** 0.5)), (2, 5, 16), {"ScaleNorm": 1}, {},
                         set(), harness.WAYS),
    # test_groupnorm.py::test_unet_resnet_block_group_norms_are_recognized_and_lowered
    "diffusers ResnetBlock GroupNorm": (_corpus_randomized(groupnorm_corpus, groupnorm_corpus.ResnetBlock, 0),
                                        (2, 8, 6, 6), {"GroupNorm": 2}, {"GroupNorm": 2}, {"GroupNormalization"},
                                        harness.WAYS),
    # test_affine_sources.py::test_frozen_batchnorm_backbone_folds_into_both_convs
    "torchvision FrozenBatchNorm2d": (_corpus_randomized(affine_corpus, affine_corpus.FrozenBNBackbone, 1),
                                      (2, 3, 8, 8), {}, {}, {"Mul", "Add", "Sub", "Div"}, harness.WAYS),
    # test_mpbn_reference.py::test_mpbn_spiking_block_folds_every_norm_with_identical_spikes
    "MPBN LIFAct spiking block": (_corpus_randomized(mpbn_corpus, mpbn_corpus.SpikingBlock, 2), (2, 3, 6, 6),
                                  {"BatchNorm": 8}, {}, {"BatchNormalization", "Tanh"}, harness.WAYS),
}

PARAMS = [pytest.param(case, way, opset, id=f"{case}-{way}-{opset}")
          for case, (*_, ways) in CASES.items() for way in ways for opset in OPSETS]


@pytest.mark.slow
@pytest.mark.parametrize("case, way, opset", PARAMS)
def test_reference_spelling_at_every_opset(case, way, opset, tmp_path):
    factory, shape, before, after, gone, _ = CASES[case]
    result = harness.check(factory(), (torch.randn(*shape),), way, tmp_path, before=before, after=after, opset=opset)
    model = result.optimized_model
    present = collections.Counter(n.op_type for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx"))
    left = sorted(op for op in gone if present[op])
    assert not left, f"{case} ({way}, opset {opset}): {left} still in the optimized model: {dict(present)}"
    opset_of = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    assert opset_of == opset, f"the optimized model is at opset {opset_of}, exported at {opset}"
