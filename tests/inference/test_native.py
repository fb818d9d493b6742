"""The fused native refine kernel (``sar_native::refine_stage``) equals the PyTorch fallback and
the dense masked path, through ``switch_to_deploy()``.

The native library is built by ``scripts/install.sh``; these tests fail (never skip) without it.
"""
import os
import os.path as osp
import warnings

import pytest
import torch

from sar_backbones.inference import native, ops
from sar_backbones.inference.deploy import is_kernel_layout
from sar_backbones.inference.sparse import refine_stage
from sar_backbones.models import SARResNeXt
from sar_backbones.models.errors import InvalidArgumentError
from tests.inference.helpers import (NARROW_50, OS8, assert_close, deployed_copy, eval_model,
                                     force_selection, forward, relative_error)
from tests.models.helpers import randomize_norms

# A narrow SAR-ResNeXt-50: cardinality 8, so each of the G=2 mask groups owns 4 conv groups.
TINY_RESNEXT = dict(depth=50, stem_channels=16, base_channels=16, groups=8, base_width=2,
                    mask_groups=2)


@pytest.fixture(autouse=True)
def restore_kernel_choice():
    yield
    native.set_refine_kernel(None)


def _forbidden(*args, **kwargs):
    raise AssertionError('the other refine implementation ran')


def _sparse_outputs(model, x, kernel, monkeypatch):
    """Sparse outputs with ``kernel`` chosen, checking that it (and not the other one) runs."""
    native.set_refine_kernel(kernel)
    with monkeypatch.context() as patch:
        if kernel == 'native':
            patch.setattr(ops, 'refine_stage', _forbidden)
        else:
            patch.setattr(native, 'refine_stage', _forbidden)
        outs, masks = forward(model, x)
    native.set_refine_kernel(None)
    return outs, masks


def _check_model(model, x, monkeypatch, partial=True):
    """native == torch fallback == dense path of the undeployed model, same masks."""
    dense, masks = forward(model, x, 'dense')
    deployed = deployed_copy(model)
    native_outs, native_masks = _sparse_outputs(deployed, x, 'native', monkeypatch)
    torch_outs, torch_masks = _sparse_outputs(deployed, x, 'torch', monkeypatch)
    assert_close(native_outs, dense)
    assert_close(torch_outs, dense)
    assert_close(native_outs, torch_outs)
    for got in (native_masks, torch_masks):
        assert all(torch.equal(a, b) for a, b in zip(got, masks))
    if partial:  # a real test of the gathers: some patches refined, some not
        assert 0 < float(deployed.get_activation_rates().mean()) < 1


def test_native_library_is_built():
    assert native.load(), (f'the native refine kernel is not built ({native.library_path()}): '
                           f'run `{native.BUILD_COMMAND}` or scripts/install.sh')


@pytest.mark.parametrize('kwargs,size', [
    (dict(), (1, 3, 67, 93)),                                   # BasicBlock, odd size
    (dict(mask_groups=1), (1, 3, 61, 75)),                      # G = 1
    (dict(NARROW_50, patch_size=(4, 4, 7)), (2, 3, 61, 80)),    # Bottleneck, B = 2
    (dict(OS8), (1, 3, 72, 64)),                                # dilations 2 and 4
    (dict(NARROW_50, **OS8), (1, 3, 64, 72)),                   # Bottleneck, OS8
])
def test_native_equals_fallback_and_dense(kwargs, size, monkeypatch):
    model = eval_model(seed=30, **kwargs)
    _check_model(model, torch.randn(*size, generator=torch.Generator().manual_seed(1)),
                 monkeypatch)


@pytest.mark.parametrize('seed', [0, 1])
def test_native_random_masks_batch(seed, monkeypatch):
    model = eval_model(seed=31, **NARROW_50)
    model.set_mask_override(0.4, seed=seed)
    _check_model(model, torch.randn(3, 3, 59, 67), monkeypatch)


@pytest.mark.parametrize('keep', [True, False])
def test_native_all_and_nothing_selected(keep, monkeypatch):
    model = force_selection(eval_model(seed=32, **NARROW_50), keep)
    _check_model(model, torch.randn(2, 3, 64, 64), monkeypatch, partial=False)


def test_native_sar_resnext_grouped_3x3(monkeypatch):
    torch.manual_seed(33)
    model = randomize_norms(SARResNeXt(**TINY_RESNEXT), seed=33).eval()
    generator = torch.Generator().manual_seed(33)
    with torch.no_grad():  # learned masks that select part of the patches
        for stage in model.sar_stages:
            for selector in stage.selectors:
                selector.fc.weight.normal_(0, 3.0, generator=generator)
    _check_model(model, torch.randn(1, 3, 67, 77), monkeypatch)


def _stage_call(model, x):
    """The arguments of the first stage's refine op in a deployed model."""
    calls = []

    def spy(*args):
        calls.append(args)
        return refine_stage(*args)

    native.set_refine_kernel('torch')
    original = ops.refine_stage
    ops.refine_stage = spy
    try:
        forward(model, x)
    finally:
        ops.refine_stage = original
        native.set_refine_kernel(None)
    return calls[0]


@pytest.mark.parametrize('channels_last', [False, True])
def test_native_op_input_layouts_and_output_strides(channels_last):
    model = deployed_copy(eval_model(seed=34, **NARROW_50))
    x, masks, *rest = _stage_call(model, torch.randn(2, 3, 61, 70))
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    before = x.clone()
    expected = refine_stage(x, masks, *rest)
    out = native.refine_stage(x, masks, *rest)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert relative_error(out, expected) < 1e-4
    assert torch.equal(x, before)  # the input is never written (identity blocks work on a copy)


def test_deploy_prepacks_the_weights_in_place_of_the_state():
    """Deployed refine weights are stored in the kernel's layout, read in place: no packed copy
    that could go stale, and the state dict (keys, values) is what it was."""
    model = eval_model(seed=35, **NARROW_50)
    deployed = deployed_copy(model)
    reference = deployed_copy(model)
    for stage in deployed.sar_stages:
        for block in stage.refine_blocks:
            for conv, _ in block.convs_and_norms:
                assert is_kernel_layout(conv.weight)  # HWIO, padded rows
    state = {key: value.clone() for key, value in deployed.state_dict().items()}
    assert state.keys() == reference.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    x, masks, weights, *rest = _stage_call(deployed, torch.randn(1, 3, 64, 64))
    assert weights[1] is deployed.layer1.refine_blocks[0].conv2.weight  # no copy
    first = native.refine_stage(x, masks, weights, *rest)
    with torch.no_grad():
        weights[1].mul_(1.5)
    second = native.refine_stage(x, masks, weights, *rest)
    assert relative_error(second, refine_stage(x, masks, weights, *rest)) < 1e-4
    assert (second - first).abs().max() > 1e-3
    deployed.load_state_dict(state)  # copies into the prepacked weights: layout kept
    assert is_kernel_layout(deployed.layer1.refine_blocks[0].conv2.weight)
    assert relative_error(native.refine_stage(x, masks, weights, *rest), first) < 1e-6


def test_undeployed_model_runs_native_with_weights_laid_out_per_call(monkeypatch):
    model = eval_model(seed=37, **NARROW_50)
    x = torch.randn(1, 3, 61, 66)
    dense, _ = forward(model, x, 'dense')
    native_outs, _ = _sparse_outputs(model, x, 'native', monkeypatch)
    torch_outs, _ = _sparse_outputs(model, x, 'torch', monkeypatch)
    assert_close(native_outs, dense)
    assert_close(native_outs, torch_outs)


def test_kernel_choice_is_checked(monkeypatch):
    with pytest.raises(InvalidArgumentError, match='kernel must be one of'):
        native.set_refine_kernel('fast')
    monkeypatch.setenv(native.ENV_KERNEL, 'cuda')
    with pytest.raises(InvalidArgumentError, match='SAR_REFINE_KERNEL must be one of'):
        native.refine_kernel()
    monkeypatch.setenv(native.ENV_KERNEL, 'torch')
    assert native.refine_kernel() == 'torch'
    assert not native.use_native(torch.zeros(1))
    native.set_refine_kernel('auto')  # the function wins over the variable
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert native.use_native(torch.zeros(1))
        assert not native.use_native(torch.zeros(1, dtype=torch.float64))  # other dtypes
        # auto: the PyTorch implementation above AUTO_MAX_THREADS (faster there), unless forced
        torch.set_num_threads(native.AUTO_MAX_THREADS + 1)
        assert not native.use_native(torch.zeros(1))
        native.set_refine_kernel('native')
        assert native.use_native(torch.zeros(1))
    finally:
        torch.set_num_threads(threads)


def test_unbuilt_library_falls_back_with_one_warning_or_fails_when_forced(monkeypatch):
    monkeypatch.setattr(native, 'load', lambda: False)
    monkeypatch.setattr(native, '_warned', False)
    model = deployed_copy(eval_model(seed=36))
    x = torch.randn(1, 3, 64, 64)
    expected, _ = forward(model, x, 'dense')
    with pytest.warns(RuntimeWarning, match='python -m sar_backbones.inference.native build'):
        outs, _ = forward(model, x)
    assert_close(outs, expected)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # only once
        forward(model, x)
    native.set_refine_kernel('native')
    with pytest.raises(RuntimeError, match='python -m sar_backbones.inference.native build'):
        forward(model, x)


def test_unloadable_library_falls_back_with_one_warning_or_fails_when_forced(
        tmp_path, monkeypatch):
    """A library file that exists but cannot be loaded (half-built, another torch): with
    ``auto`` the PyTorch path runs after one warning naming the build command."""
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    path = native.library_path()
    assert path.startswith(str(tmp_path))
    native_dir = osp.dirname(path)
    os.makedirs(native_dir)
    with open(path, 'wb') as f:
        f.write(b'\x7fELF half-written')
    monkeypatch.setattr(native, '_loaded', None)  # not tried yet in this "process"
    monkeypatch.setattr(native, '_load_error', None)
    monkeypatch.setattr(native, '_warned', False)
    model = deployed_copy(eval_model(seed=38))
    x = torch.randn(1, 3, 64, 64)
    expected, _ = forward(model, x, 'dense')
    with monkeypatch.context() as patch:
        patch.setattr(native, 'refine_stage', _forbidden)
        with pytest.warns(RuntimeWarning, match='cannot be loaded') as record:
            outs, _ = forward(model, x)
        assert native.BUILD_COMMAND in str(record[0].message)
        assert_close(outs, expected)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # only once
            forward(model, x)
    assert not native.load() and 'cannot be loaded' in native.load_error()
    native.set_refine_kernel('native')
    with pytest.raises(RuntimeError, match='SAR_REFINE_KERNEL=native.*cannot be loaded'):
        forward(model, x)
