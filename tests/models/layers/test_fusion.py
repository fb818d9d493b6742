"""Adaptive fusion (Eq. 5) in every memory-format combination, against a plain reference."""
import itertools

import pytest
import torch

from sar_backbones.inference.memory_format import copy_to_rows_, memory_format_of, rows_to_nchw
from sar_backbones.models.layers import FusionGate
from sar_backbones.models.layers.masking import fuse_upsampled, nearest_source_index

NCHW, NHWC = torch.contiguous_format, torch.channels_last


def _reference(low, high, weight):
    rows = nearest_source_index(high.shape[-2], low.shape[-2], low.device)
    cols = nearest_source_index(high.shape[-1], low.shape[-1], low.device)
    up = low[:, :, rows][:, :, :, cols]
    return torch.relu(weight * up + (1 - weight) * high)


@pytest.mark.parametrize('low_format,high_format', list(itertools.product([NCHW, NHWC], repeat=2)))
@pytest.mark.parametrize('low_size,high_size', [((7, 9), (14, 18)), ((7, 9), (28, 18)),
                                                ((5, 5), (9, 11))])
@pytest.mark.parametrize('in_place', [False, True])
def test_fuse_upsampled_matches_reference_in_the_low_maps_format(low_format, high_format, low_size,
                                                                 high_size, in_place):
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(2, 6, *low_size, generator=generator).contiguous(memory_format=low_format)
    high = torch.randn(2, 6, *high_size, generator=generator).contiguous(memory_format=high_format)
    weight = torch.rand(2, 6, 1, 1, generator=generator)
    expected = _reference(low, high, weight)
    with torch.no_grad():
        out = fuse_upsampled(low, high.clone(memory_format=torch.preserve_format), weight,
                             in_place=in_place)
    assert torch.allclose(out, expected, atol=1e-6)
    assert memory_format_of(out) == low_format and out.is_contiguous(memory_format=low_format)


@pytest.mark.parametrize('low_format,high_format', [(NCHW, NCHW), (NHWC, NHWC), (NCHW, NHWC)])
def test_fusion_gate_gradients_match_reference(low_format, high_format):
    gate = FusionGate(16, reduction=4)
    low = torch.randn(2, 16, 4, 6).contiguous(memory_format=low_format).requires_grad_()
    high = torch.randn(2, 16, 8, 12).contiguous(memory_format=high_format).requires_grad_()
    out = gate(low, high)
    grads = torch.autograd.grad(out.square().sum(), [low, high, gate.fc1.weight])
    expected = _reference(low, high, gate.weights(low))
    expected_grads = torch.autograd.grad(expected.square().sum(), [low, high, gate.fc1.weight])
    assert torch.allclose(out, expected, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-5)


# back to NCHW: blocked 2-D transposes on 1 and 2 threads, the strided copy on 4
# (memory_format.BLOCKED_TO_NCHW_MAX_THREADS)
@pytest.mark.parametrize('threads', [1, 2, 4])
@pytest.mark.parametrize('memory_format', [NCHW, NHWC])
def test_row_layout_round_trip(memory_format, threads):
    torch.set_num_threads(threads)  # restored by the one_thread fixture
    x = torch.randn(3, 5, 4, 7).contiguous(memory_format=memory_format)
    rows = copy_to_rows_(torch.empty(3 * 4 * 7, 5), x)
    assert torch.equal(rows, x.permute(0, 2, 3, 1).reshape(-1, 5))
    nhwc = rows.view(3, 4, 7, 5).permute(0, 3, 1, 2)
    back = rows_to_nchw(nhwc)
    assert back.is_contiguous() and torch.equal(back, x)
    # differentiable
    leaf = nhwc.clone().requires_grad_()
    rows_to_nchw(leaf).mul(torch.arange(5.).view(1, 5, 1, 1)).sum().backward()
    assert torch.equal(leaf.grad, torch.arange(5.).view(1, 5, 1, 1).expand_as(leaf))
