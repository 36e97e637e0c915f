"""The trainable modules: the masked linear layer's effective mask rule (algorithms.md §3.1), the FAM's
per-sample standardisation (§3.2), parameter counts (§2.1, §3.2, §3.3)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmedclip.modules import (
    MASK_MARGIN,
    FacmicAttention,
    FeatureAdaptationModule,
    MaskedLinear,
    PrivateMLP,
    adapt,
    per_sample_standardise,
)


def _layer(weight: list[list[float]], threshold: list[float], rule: str = "code") -> MaskedLinear:
    w = torch.tensor(weight)
    layer = MaskedLinear(w.shape[1], w.shape[0], rule)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.threshold.copy_(torch.tensor(threshold))
        layer.bias.copy_(torch.arange(w.shape[0], dtype=torch.float32) * 0.1)
    return layer


def _ref_forward(weight, bias, mask_rows, x):
    """y_bi = Σ_j W_ij m_i x_bj + b_i, with loops."""
    out = []
    for xb in x:
        out.append(
            [
                sum(weight[i][j] * mask_rows[i] * xb[j] for j in range(len(xb))) + bias[i]
                for i in range(len(weight))
            ]
        )
    return out


# ----------------------------------------------------------------------------- `code` rule


def test_code_rule_keeps_a_row_iff_mean_abs_weight_minus_threshold_exceeds_margin():
    weight = [
        [0.02, -0.02, 0.02, -0.02],  # mean|W| 0.02, t 0      -> 0.02 > 0.01: kept
        [0.009, -0.009, 0.009, 0.009],  # 0.009                -> dropped
        [0.5, 0.5, -0.5, 0.5],  # 0.5, t 0.485: 0.015         -> kept
        [0.5, 0.5, -0.5, 0.5],  # 0.5, t 0.495: 0.005         -> dropped (the threshold counts)
        [0.0, 0.0, 0.0, 0.044],  # 0.011                      -> kept (the mean, not the max or the sum)
        [0.03, 0.0, 0.0, 0.0],  # 0.0075                      -> dropped
    ]
    threshold = [0.0, 0.0, 0.485, 0.495, 0.0, 0.0]
    layer = _layer(weight, threshold)
    want = [
        1.0 if sum(abs(v) for v in row) / len(row) - t > MASK_MARGIN else 0.0
        for row, t in zip(weight, threshold, strict=True)
    ]
    assert want == [1, 0, 1, 0, 1, 0]
    with torch.no_grad():
        m = layer.mask()
    assert m.shape == (6, 1)
    assert m.squeeze(1).tolist() == want
    with torch.enable_grad():  # the autograd path applies the same forward rule
        assert layer.mask().squeeze(1).tolist() == want

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    layer.eval()
    got = layer(x)
    ref = _ref_forward(weight, layer.bias.tolist(), want, x.tolist())
    assert torch.allclose(got, torch.tensor(ref), atol=1e-6)


def test_code_rule_thresholds_get_zero_gradient_and_dropped_rows_none():
    torch.manual_seed(0)
    layer = MaskedLinear(16, 6)
    with torch.no_grad():
        layer.weight[2] *= 0.05  # init bound 1/4: mean|W| ~ 0.125 -> ~0.006 < 0.01, row 2 dropped
    with torch.no_grad():
        assert layer.mask().squeeze(1).tolist() == [1, 1, 0, 1, 1, 1]
    x = torch.randn(5, 16)
    layer.train()
    (layer(x) ** 2).sum().backward()
    assert torch.count_nonzero(layer.threshold.grad) == 0
    assert torch.count_nonzero(layer.weight.grad[2]) == 0  # masked row: no gradient through W ⊙ m
    kept = [i for i in range(6) if i != 2]
    assert torch.all(layer.weight.grad[kept].abs().sum(1) > 0)
    # W's gradient is exactly the plain linear one on kept rows (the mask path contributes nothing).
    ref = nn.Linear(16, 6)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
        ref.weight[2] = 0
    (ref(x) ** 2).sum().backward()
    assert torch.allclose(layer.weight.grad[kept], ref.weight.grad[kept], atol=1e-6)


def test_code_rule_thresholds_stay_zero_under_adamw():
    torch.manual_seed(1)
    layer = MaskedLinear(8, 4)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.02)
    for _ in range(5):
        opt.zero_grad()
        (layer(torch.randn(6, 8)) ** 2).mean().backward()
        opt.step()
    assert torch.count_nonzero(layer.threshold) == 0


def test_shrinking_one_row_drops_exactly_that_row():
    torch.manual_seed(2)
    layer = MaskedLinear(512, 8)
    layer.eval()
    # kaiming-uniform init: mean|W| ~ bound/2 = 0.022 > 0.01, every row kept
    assert layer.mask().squeeze(1).tolist() == [1.0] * 8
    with torch.no_grad():
        row = layer.weight[5].abs().mean().item()
        layer.weight[5] *= 0.009 / row  # mean|W_5| = 0.009 < 0.01
    assert layer.mask().squeeze(1).tolist() == [1.0] * 5 + [0.0] + [1.0] * 2
    x = torch.randn(4, 512)
    y = layer(x)
    assert torch.allclose(y[:, 5], layer.bias[5].expand(4))  # only the bias survives
    with torch.no_grad():
        layer.weight[5] *= 0.0111 / 0.009  # back above the margin: the row returns
    assert layer.mask().squeeze(1).tolist() == [1.0] * 8


def test_thresholds_reset_when_almost_everything_is_masked():
    layer = _layer([[0.5, 0.5]] * 4, [1.0] * 4)  # every row dropped (0.5 - 1.0 < 0.01)
    x = torch.ones(2, 2)
    layer.eval()
    assert torch.allclose(layer(x), layer.bias.expand(2, 4))  # eval: no reset
    assert torch.all(layer.threshold == 1.0)
    layer.train()
    y = layer(x)
    assert torch.count_nonzero(layer.threshold) == 0
    assert torch.allclose(y, torch.ones(2, 4) + layer.bias)


# ----------------------------------------------------------------------------- `dst` rule


def _dst_derivative(s: float) -> float:
    a = abs(s)
    return 2 - 4 * a if a <= 0.4 else (0.4 if a <= 1 else 0.0)


def test_dst_rule_is_elementwise_and_thresholds_learn():
    weight = [[0.3, -0.05, 0.2], [-0.6, 0.1, 0.0], [0.02, 0.9, -1.5]]
    threshold = [0.1, 0.05, 0.5]
    layer = _layer(weight, threshold, "dst")
    s = [[abs(w) - t for w in row] for row, t in zip(weight, threshold, strict=True)]
    want = [[1.0 if v > 0 else 0.0 for v in row] for row in s]
    with torch.no_grad():
        assert layer.mask().tolist() == want
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]])
    y = layer(x)
    ref = [
        [sum(weight[i][j] * want[i][j] * xb[j] for j in range(3)) + layer.bias[i].item() for i in range(3)]
        for xb in x.tolist()
    ]
    assert torch.allclose(y, torch.tensor(ref), atol=1e-6)

    # Gradient of L = Σ y: dL/dm_ij = W_ij Σ_b x_bj; the threshold sees -dstep(s_ij) of it.
    y.sum().backward()
    xs = [sum(xb[j] for xb in x.tolist()) for j in range(3)]
    for i in range(3):
        g_t = sum(-weight[i][j] * xs[j] * _dst_derivative(s[i][j]) for j in range(3))
        assert layer.threshold.grad[i].item() == pytest.approx(g_t, rel=1e-5, abs=1e-6)
        for j in range(3):
            sign = 1.0 if weight[i][j] > 0 else (-1.0 if weight[i][j] < 0 else 0.0)
            g_w = want[i][j] * xs[j] + weight[i][j] * xs[j] * _dst_derivative(s[i][j]) * sign
            assert layer.weight.grad[i, j].item() == pytest.approx(g_w, rel=1e-5, abs=1e-6)
    assert torch.count_nonzero(layer.threshold.grad) > 0


def test_unknown_mask_rule_is_refused():
    with pytest.raises(ValueError, match="mask rule"):
        MaskedLinear(4, 4, "magic")


# ----------------------------------------------------------------------------- FAM and friends


def test_per_sample_standardise_equals_instance_norm_on_unbatched_input():
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns that dim 0 (7) != num_features (32)
        want = nn.InstanceNorm1d(32)(x)
    got = per_sample_standardise(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.mean(1), torch.zeros(7), atol=1e-5)
    # per sample, not per feature: a sample's output does not depend on the other samples
    assert torch.allclose(per_sample_standardise(x[:1]), got[:1], atol=1e-6)


def test_fam_forward_composition():
    torch.manual_seed(3)
    fam = FeatureAdaptationModule(16)
    f = torch.randn(5, 16)
    a = fam(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norm = nn.InstanceNorm1d(16)
        w1, b1 = fam.fc1.weight * fam.fc1.mask(), fam.fc1.bias
        w2, b2 = fam.fc2.weight * fam.fc2.mask(), fam.fc2.bias
        want = torch.softmax(F.linear(F.relu(norm(F.linear(f, w1, b1))), w2, b2), dim=1)
    assert torch.allclose(a, want, atol=1e-6)
    assert torch.allclose(a.sum(1), torch.ones(5), atol=1e-6)
    h = adapt(fam, f)
    assert torch.allclose(h, F.normalize(a * f, dim=1))
    assert torch.allclose(h.norm(dim=1), torch.ones(5), atol=1e-6)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    fam = FeatureAdaptationModule(512)
    assert _count(fam) == 526_336
    assert sum(p.numel() for n, p in fam.named_parameters() if n.endswith("threshold")) == 1_024
    att = FacmicAttention(512)
    assert sum(p.numel() for p in att.parameters() if p.requires_grad) == 526_336
    assert {"net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"} <= set(att.state_dict())
    mlp = PrivateMLP(512, 4)
    # 3 x (masked 512x512 + bias + thresholds + BN affine) + masked 512x4 + bias + thresholds: ~0.79M
    assert _count(mlp) == 3 * (512 * 512 + 512 + 512 + 2 * 512) + 512 * 4 + 4 + 4
    assert 0.78e6 < _count(mlp) < 0.80e6


def test_facmic_attention_structure():
    att = FacmicAttention(8)
    kinds = [type(m) for m in att.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear, nn.Softmax]
    assert att.net[2].negative_slope == 0.01
    att.eval()
    a = att(torch.randn(3, 8))
    assert torch.allclose(a.sum(1), torch.ones(3), atol=1e-6) and torch.all(a > 0)
