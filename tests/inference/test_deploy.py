"""The one-time deploy step: same function in every mode, no caches, inference only."""
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from sar_backbones.inference.deploy import deploy_backbone, is_kernel_layout
from sar_backbones.models.layers import StackedRegionSelectors, blocks, region_selection
from tests.inference.helpers import (NARROW_50, OS8, assert_close, deployed_copy, eval_model,
                                     force_selection, forward)


@pytest.mark.parametrize('kwargs,size', [
    (dict(), (1, 3, 67, 93)),                               # BasicBlock, odd size
    (dict(NARROW_50, patch_size=(4, 4, 7)), (2, 3, 61, 80)),  # Bottleneck, patch_size
    (dict(OS8), (1, 3, 64, 72)),                            # dilated stages
])
def test_deployed_equals_undeployed_in_both_modes(kwargs, size):
    model = eval_model(seed=3, **kwargs)
    x = torch.randn(*size)
    dense, masks = forward(model, x, 'dense')
    deployed = deployed_copy(model)
    for mode in ('dense', 'sparse'):
        outs, deployed_masks = forward(deployed, x, mode)
        assert_close(outs, dense)
        assert all(torch.equal(a, b) for a, b in zip(deployed_masks, masks))
    assert 0 < float(deployed.get_activation_rates().mean()) < 1  # partial masks: a real test


def test_deploy_folds_everything_and_leaves_no_cache():
    model = eval_model(seed=4, **NARROW_50)
    deploy_backbone(model)
    assert model._deployed
    assert not [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    for stage in model.sar_stages:
        assert isinstance(stage.selectors, StackedRegionSelectors)
        for block in stage.refine_blocks:
            for conv, _ in block.convs_and_norms:
                assert conv.bias is not None
                # the native kernel's layout (HWIO), read in place: prepacked once, here
                assert is_kernel_layout(conv.weight)
    deploy_backbone(model)  # a second deploy is a no-op


def test_deployed_forward_walks_no_weights(monkeypatch):
    model = deployed_copy(eval_model(seed=5))
    x = torch.randn(1, 3, 64, 64)
    expected, _ = forward(model, x)

    def forbidden(*args, **kwargs):
        raise AssertionError('a deployed forward walked the weights')

    monkeypatch.setattr(blocks, 'weights_key', forbidden)
    monkeypatch.setattr(region_selection, 'weights_key', forbidden)
    monkeypatch.setattr(blocks.ResidualBlock, 'folded', forbidden)
    outs, _ = forward(model, x)
    assert all(torch.equal(a, b) for a, b in zip(outs, expected))


def test_deployed_weights_are_the_state():
    """Nothing can go stale: a changed folded weight shows in both modes at once."""
    model = deployed_copy(eval_model(seed=6))
    x = torch.randn(1, 3, 64, 64)
    before, _ = forward(model, x)
    with torch.no_grad():
        model.layer1.refine_blocks[0].conv1.weight.mul_(1.5)
    dense, _ = forward(model, x, 'dense')
    sparse, _ = forward(model, x, 'sparse')
    assert_close(sparse, dense)
    assert (dense[0] - before[0]).abs().max() > 1e-3


def test_train_after_deploy_is_an_error():
    model = deployed_copy(eval_model(seed=7))
    with pytest.raises(RuntimeError, match='deploy'):
        model.train()
    assert not model.training
    with pytest.raises(RuntimeError, match='deployed models are inference-only'):
        model.layer2.train()
    model.eval()  # still fine


def test_deploy_needs_eval_mode():
    model = eval_model(seed=8).train()
    with pytest.raises(RuntimeError, match=r'needs an eval model'):
        deploy_backbone(model)
    assert not getattr(model, '_deployed', False)


def test_deploy_refuses_non_finite_weights():
    model = eval_model(seed=9)
    with torch.no_grad():
        model.layer2.selectors[0].fc.weight[0, 0] = float('nan')
    with pytest.raises(ValueError, match=r'layer2\.selectors\.0\.fc\.weight holds NaN'):
        deploy_backbone(model)
    assert any(isinstance(m, _BatchNorm) for m in model.modules())  # nothing was changed


@pytest.mark.parametrize('stacked', [True, False])
def test_non_finite_selector_logits_in_eval_are_an_error(stacked, monkeypatch):
    """A NaN selector would binarise to 'skip' everywhere and silently refine nothing."""
    if not stacked:
        monkeypatch.setattr(region_selection, '_STACK_MAX_BYTES', -1)
    model = eval_model(seed=10)
    for stage in model.sar_stages:
        stage.set_name(f'layer{model.sar_stages.index(stage) + 1}')
    with torch.no_grad():
        model.layer3.selectors[0].fc.bias[1] = float('inf') * 0  # NaN
    with pytest.raises(FloatingPointError, match=r'layer3\.selectors\.0 .*non-finite'):
        forward(model, torch.randn(1, 3, 64, 64))


def test_non_finite_input_logits_after_deploy_are_an_error():
    model = deployed_copy(eval_model(seed=11))
    x = torch.randn(1, 3, 64, 64)
    x[0, 0, 5, 5] = float('nan')
    with pytest.raises(FloatingPointError, match=r'layer1\.selectors\.\d .*non-finite'):
        forward(model, x)


@pytest.mark.parametrize('kwargs', [dict(), dict(NARROW_50)])
def test_mmcv_fuse_conv_bn_keeps_the_function(kwargs):
    """mmcv's fuse_conv_bn folds BN into the conv before it; the masked last 3x3 conv of a
    BasicBlock must still add the folded shift after the mask, in both modes."""
    from mmcv.cnn import fuse_conv_bn
    model = eval_model(seed=12, **kwargs)
    x = torch.randn(1, 3, 67, 75)
    reference = {mode: forward(model, x, mode)[0] for mode in ('dense', 'sparse')}
    fuse_conv_bn(model)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    for mode in ('dense', 'sparse'):
        assert_close(forward(model, x, mode)[0], reference['dense'])
    # And deploying a fused model still works.
    deploy_backbone(model)
    assert_close(forward(model, x)[0], reference['dense'])


@pytest.mark.parametrize('keep', [True, False])
def test_all_and_nothing_selected(keep):
    model = force_selection(eval_model(seed=13, **NARROW_50), keep)
    x = torch.randn(1, 3, 64, 64)
    dense, _ = forward(model, x, 'dense')
    deployed = deployed_copy(model)
    outs, _ = forward(deployed, x)
    assert_close(outs, dense)
    assert float(deployed.get_activation_rates().mean()) == float(keep)


def test_deployed_under_inference_mode_and_autograd():
    model = deployed_copy(eval_model(seed=14))
    x = torch.randn(1, 3, 64, 64)
    expected, _ = forward(model, x, 'dense')
    with torch.inference_mode():
        outs = model(x)
    assert_close(outs, expected)
    x.requires_grad_(True)  # eval with gradients: the dense path, folded weights
    model(x)[-1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
