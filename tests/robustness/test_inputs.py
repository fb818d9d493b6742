"""Odd but valid inputs work in both inference paths, which agree.

Every model here has random BN statistics (so folding errors show) and
feature-driven selectors that keep part of the patches (learned masks, not
all-selected), except where noted.
"""
import math
from contextlib import contextmanager

import pytest
import torch

import sar_backbones.models.backbones.sar_stage as sar_stage_module
from tests.robustness.helpers import eval_model, relative_error, run_paths

PATCH_SIZE = dict(patch_grid=None, patch_size=(4, 4, 7))  # detection mode
PATCH_GRID = dict(patch_grid=(4, 2, 1))                   # paper mode, fits 13x13 and up


def _expected_sizes(height, width):
    sizes, h, w = [], height, width
    for stride in (4, 2, 2, 2):
        for _ in range(int(math.log2(stride))):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def _assert_paths_agree(dense, sparse, tolerance=1e-4):
    (dense_outs, dense_masks), (sparse_outs, sparse_masks) = dense, sparse
    assert all(torch.equal(a, b) for a, b in zip(dense_masks, sparse_masks))
    for d, s in zip(dense_outs, sparse_outs):
        assert d.shape == s.shape and d.dtype == s.dtype
        assert torch.isfinite(s).all()
        assert relative_error(s.float(), d.float()) < tolerance


@pytest.fixture(scope='module')
def models():
    return {'patch_size': eval_model(**PATCH_SIZE), 'patch_grid': eval_model(**PATCH_GRID),
            'groups4': eval_model(groups=4, **PATCH_SIZE)}


SHAPES = [
    (1, 64, 64),     # batch 1
    (16, 32, 32),    # a large batch of small images
    (2, 45, 77),     # non-square, odd
    (1, 97, 61),     # odd, portrait
    (3, 100, 140),   # not divisible by 32
    (1, 13, 150),    # extreme aspect ratio, smallest height the 4x4 grid allows
]


@pytest.mark.parametrize('name', ['patch_size', 'patch_grid', 'groups4'])
def test_sparse_equals_dense_on_odd_shapes(models, name):
    model = models[name]
    rates = []
    for batch, height, width in SHAPES:
        x = torch.randn(batch, 3, height, width)
        dense, sparse = run_paths(model, x)
        _assert_paths_agree(dense, sparse)
        sizes = _expected_sizes(height, width)
        assert [tuple(o.shape) for o in sparse[0]] == [
            (batch, c, h, w) for c, (h, w) in zip((16, 32, 64, 128), sizes)]
        rates.append(float(model.get_activation_rates().mean()))
    # The learned masks were partial: the comparisons covered selected and skipped regions.
    assert 0.05 < sum(rates) / len(rates) < 0.95, rates


def test_large_batch_equals_images_one_by_one(models):
    model = models['patch_size']
    x = torch.randn(16, 3, 32, 40)
    with torch.no_grad():
        batched = [o.clone() for o in model(x)]
        batched_masks = [m.clone() for m in model.get_masks()]
        for index in (0, 7, 15):
            single = model(x[index:index + 1])
            for mask, batch_mask in zip(model.get_masks(), batched_masks):
                assert torch.equal(mask[0], batch_mask[index])
            for s, b in zip(single, batched):
                assert relative_error(s[0], b[index]) < 1e-5


def test_channels_last_and_non_contiguous_inputs(models):
    model = models['patch_size']
    x = torch.randn(2, 3, 45, 77)
    reference = run_paths(model, x)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    strided = torch.randn(2, 3, 90, 77)[:, :, ::2]  # a non-contiguous view, 45 rows
    for variant in (channels_last, strided):
        dense, sparse = run_paths(model, variant)
        _assert_paths_agree(dense, sparse)
    dense, sparse = run_paths(model, channels_last)
    for new, old in zip(dense[0] + sparse[0], reference[0][0] + reference[1][0]):
        assert relative_error(new, old) < 1e-5


def test_channels_last_model():
    model = eval_model(seed=1, **PATCH_SIZE)
    x = torch.randn(2, 3, 45, 77)
    reference = run_paths(model, x)
    model.to(memory_format=torch.channels_last)
    dense, sparse = run_paths(model, x.contiguous(memory_format=torch.channels_last))
    _assert_paths_agree(dense, sparse)
    for new, old in zip(sparse[0], reference[1][0]):
        assert relative_error(new, old) < 1e-5


def _spy_sparse(monkeypatch):
    calls = []
    original = sar_stage_module.sparse_refine_forward

    def spy(*args, **kwargs):
        calls.append(torch.is_inference_mode_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(sar_stage_module, 'sparse_refine_forward', spy)
    return calls


def test_no_grad_and_inference_mode(models, monkeypatch):
    model = models['patch_size']
    calls = _spy_sparse(monkeypatch)
    x = torch.randn(2, 3, 45, 77)
    with_no_grad = run_paths(model, x, torch.no_grad)
    assert calls == [False] * 3  # the sparse path ran once per SAR stage
    with_inference_mode = run_paths(model, x, torch.inference_mode)
    assert calls[3:] == [True] * 3
    _assert_paths_agree(*with_inference_mode)
    for a, b in zip(with_no_grad[1][0], with_inference_mode[1][0]):
        assert torch.equal(a, b)
    # With gradients enabled, eval mode computes the dense path (autograd works).
    x.requires_grad_(True)
    outs = model(x)
    assert len(calls) == 6
    outs[-1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_inference_mode_then_training_then_eval():
    """Caches filled under inference_mode must not leak into training, and a weight update
    must reach the sparse path's BN-folded weights."""
    model = eval_model(seed=2, **PATCH_SIZE)
    x = torch.randn(2, 3, 48, 64)
    with torch.inference_mode():
        before = [o.clone() for o in model(x)]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outs = model(x)
    (sum(o.square().mean() for o in outs) + model.get_aux_losses()['loss_act_rate']).backward()
    optimizer.step()
    model.eval()
    dense, sparse = run_paths(model, x)
    _assert_paths_agree(dense, sparse)
    assert relative_error(sparse[0][-1], before[-1]) > 1e-3  # the update is visible
    with torch.inference_mode():
        again = model(x)
    for a, b in zip(again, sparse[0]):
        assert torch.equal(a, b)


@contextmanager
def _autocast(dtype):
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        yield


# Relative error of a whole output map: bf16 keeps 8 mantissa bits, fp16 11.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_on_cpu(dtype):
    model = eval_model(seed=3, **PATCH_SIZE)
    x = torch.randn(2, 3, 45, 77)
    fp32_dense, _ = run_paths(model, x)

    # Learned masks: both paths run under autocast, with finite low-precision outputs.
    dense, sparse = run_paths(model, x, lambda: _autocast(dtype))
    for outs, masks in (dense, sparse):
        assert all(o.dtype == dtype and torch.isfinite(o).all() for o in outs)
        assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)
    assert 0 < float(model.get_activation_rates().mean()) < 1

    # Fixed masks (a rounding difference cannot flip a decision): the paths agree with
    # each other and with float32 within the precision of the type.
    model.set_mask_override(0.5, seed=3)
    fp32_dense, _ = run_paths(model, x)
    dense, sparse = run_paths(model, x, lambda: _autocast(dtype))
    _assert_paths_agree(dense, sparse, TOLERANCE[dtype])
    for low, full in zip(sparse[0], fp32_dense[0]):
        assert relative_error(low.float(), full) < TOLERANCE[dtype]
