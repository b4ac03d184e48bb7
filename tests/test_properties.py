"""Property tests: the exact passes keep random conv/BN/linear/activation stacks exact within the dtype's tolerance."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.passes.manager import exact_tolerance

ACTIVATIONS = [nn.ReLU, nn.GELU, nn.SiLU, nn.Identity, nn.Tanh]


@st.composite
def conv_stacks(draw):
    """conv (random kernel, stride, padding, dilation, groups, bias) -> BN (random statistics, affine or not)
    -> activation, a few times, then flatten -> linear -> BN1d -> activation -> linear."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    channels, size = draw(st.integers(1, 4)) * 2, draw(st.integers(6, 10))
    input_size = size
    layers: list[nn.Module] = []
    cin = draw(st.sampled_from([1, 3, 4]))
    for _ in range(draw(st.integers(1, 3))):
        kernel = draw(st.sampled_from([1, 3]))
        dilation = draw(st.sampled_from([1, 2])) if kernel > 1 else 1
        reach = dilation * (kernel - 1) + 1
        padding = draw(st.integers(max(0, -(-(reach - size) // 2)), kernel // 2 * dilation))  # output >= 1 pixel
        stride = draw(st.sampled_from([1, 2]))
        groups = draw(st.sampled_from([1, cin])) if channels % cin == 0 else 1
        layers.append(nn.Conv2d(cin, channels, kernel, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, bias=draw(st.booleans())))
        size = (size + 2 * padding - reach) // stride + 1
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(channels, affine=draw(st.booleans())))
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        cin = channels
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(cin * 4, 16, bias=draw(st.booleans()))]
    if draw(st.booleans()):
        layers.append(nn.BatchNorm1d(16, affine=draw(st.booleans())))
    layers += [draw(st.sampled_from(ACTIVATIONS))(), nn.Linear(16, 5)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):  # statistics far from the identity
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.05, 4)
            if m.affine:
                m.weight.data.uniform_(-2, 2)
                m.bias.data.uniform_(-1, 1)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return model.eval().to(dtype), torch.randn(draw(st.integers(2, 5)), layers[0].in_channels, input_size, input_size,
                                                                 dtype=dtype)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_stacks())
def test_fold_bn_and_dead_code_stay_exact_on_random_stacks(case):
    model, x = case
    with torch.no_grad():
        reference = model(x)
    result = slimfx.compress(model, (x,), pipeline="fold-bn,dead-code")  # the manager checks each pass, too
    batch_norms = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    assert sum(result.report.rewrites("fold-bn").values()) == batch_norms  # every BN follows a conv or linear
    assert result.report.final_rel_error <= exact_tolerance(reference)
    other = torch.randn(x.shape[0] + 1, *x.shape[1:], dtype=x.dtype)
    with torch.no_grad():
        expected = model(other)
        error = ((result(other).double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12))
    assert error.item() <= exact_tolerance(expected)
