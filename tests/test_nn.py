"""Training-time behaviour of the reference modules, and their eval-time formulas."""
import math

import torch

from normdeploy import nn as N


def test_unified_norm_eval_formula():
    m = N.UnifiedNorm(3, eps=1e-5).eval()
    with torch.no_grad():
        m.running_moment.copy_(torch.tensor([0.5, 2.0, 4.0]))
        m.weight.copy_(torch.tensor([1.0, -2.0, 3.0]))
        m.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.randn(2, 3, 4, 4)
    expected = x * (m.weight / torch.sqrt(m.running_moment + 1e-5)).view(1, 3, 1, 1) + m.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), expected)


def test_unified_norm_smooths_and_tracks_the_second_moment():
    torch.manual_seed(0)
    m = N.UnifiedNorm(4, window=4, momentum=0.5).train()
    for _ in range(30):
        m(torch.randn(8, 4, 5) * 3.0)  # true uncentred second moment: 9
    assert torch.allclose(m.running_moment, torch.full((4,), 9.0), rtol=0.2)
    assert int(m.history_len) == 30


def test_unified_norm_outlier_batch_is_filtered_out_of_the_window():
    torch.manual_seed(0)
    m = N.UnifiedNorm(4, window=4).train()
    for _ in range(12):
        m(torch.randn(16, 4, 5))
    before_len, before_hist = int(m.history_len), m.history.clone()
    m(torch.randn(16, 4, 5) * 100.0)  # second moment 1e4 times larger: an outlier
    assert int(m.history_len) == before_len
    assert torch.equal(m.history, before_hist)
    m(torch.randn(16, 4, 5))  # an ordinary batch enters the window again
    assert int(m.history_len) == before_len + 1


def test_power_norm_uses_previous_running_phi_then_updates_it():
    torch.manual_seed(0)
    m = N.PowerNorm(4, groups=2, momentum=0.1).train()
    with torch.no_grad():
        m.running_phi.fill_(4.0)
    x = torch.randn(3, 5, 4)
    y = m(x)
    xs = N.GroupScaling(2)(x)
    torch.testing.assert_close(y, xs / math.sqrt(4.0 + 1e-5))  # weight 1, bias 0, phi before the update
    batch_phi = xs.pow(2).reshape(-1, 4).mean(0)
    torch.testing.assert_close(m.running_phi, 0.9 * 4.0 + 0.1 * batch_phi)


def test_group_scaling_normalizes_each_group_to_unit_rms():
    x = torch.randn(2, 3, 12) * 7
    y = N.GroupScaling(3, eps=0.0)(x)
    rms = y.reshape(2, 3, 3, 4).pow(2).mean(-1)
    torch.testing.assert_close(rms, torch.ones_like(rms))


def test_crmsnorm_on_stored_coordinates_equals_rmsnorm_on_the_full_zero_mean_vector():
    d = 9
    full = torch.randn(4, d)
    full = full - full.mean(-1, keepdim=True)
    g = torch.randn(d)
    rms = N.RMSNorm(d, eps=1e-6)
    crms = N.CRMSNorm(d - 1, eps=1e-6)
    with torch.no_grad():
        rms.weight.copy_(g)
        crms.weight.copy_(g[:-1])
    torch.testing.assert_close(crms(full[:, :-1]), rms(full)[:, :-1])


def test_scale_norm_and_dyt_formulas():
    x = torch.randn(3, 5)
    s = N.ScaleNorm(5, eps=1e-5)
    torch.testing.assert_close(s(x), s.scale * x / x.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(s(torch.zeros(1, 5)), torch.zeros(1, 5))
    d = N.DynamicTanh(5, alpha_init=0.7)
    torch.testing.assert_close(d(x), torch.tanh(0.7 * x))


def test_lif_neuron_spikes_are_binary_and_reset():
    torch.manual_seed(0)
    lif = N.LIFNeuron(3, tau=0.5, theta=1.0, mpbn=False).eval()
    x = torch.full((4, 1, 3, 1, 1), 0.8)
    o = lif(x).flatten(1)[:, 0]
    # u1 = 0.8 (no spike), u2 = 0.4 + 0.8 = 1.2 (spike), u3 = 0 + 0.8 (reset), u4 = 1.2 (spike)
    assert o.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_lif_mpbn_normalizes_the_membrane_potential_before_the_threshold():
    lif = N.LIFNeuron(2, theta=0.0).eval()
    with torch.no_grad():
        lif.bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        lif.bn.weight.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([0.5, 0.5]).view(1, 1, 2, 1, 1)
    # channel 0: BN(0.5) = 0.5 - 1 < 0 -> no spike; channel 1: -(0.5 + 1) < 0 -> no spike
    assert lif(x).flatten().tolist() == [0.0, 0.0]
    x = torch.tensor([2.0, -2.0]).view(1, 1, 2, 1, 1)
    assert lif(x).flatten().tolist() == [1.0, 1.0]
