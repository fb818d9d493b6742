"""SAR-MobileNetV2: exact sparse path, gradients, the MobileNetV2 contract, complexity."""
import importlib

import pytest
import torch
from mmengine.registry import init_default_scope

from sar_backbones.analysis.complexity import count_macs, model_complexity
from sar_backbones.inference.sparse_inverted_residual import sparse_inverted_residual_stage
from sar_backbones.models import SARMobileNetV2, SARResNet
from sar_backbones.models.backbones.arguments import InvalidArgumentError
from sar_backbones.models.backbones.sar_api import SARBackboneMixin
from sar_backbones.models.layers.inverted_residual import InvertedResidual
from sar_backbones.models.layers.masking import expand_mask
from tests.models.helpers import randomize_norms, relative_error

# widen_factor 0.25: layer widths 8/8/8/16/24/40/80, stem 8; SAR layers 2-5.
TINY = dict(widen_factor=0.25, patch_grid=None, patch_size=(3, 2, 2, 2))
OS8 = dict(strides=(1, 2, 2, 1, 1, 1, 1), dilations=(1, 1, 1, 2, 2, 4, 4))
ALL_OUT = tuple(range(8))


def _eval_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_norms(SARMobileNetV2(**{**TINY, **kwargs}), seed=seed).eval()


def _set_selectors(model, keep=None, seed=0):
    """Learned masks selecting part of the patches (keep None), all (True) or none (False)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in model.sar_stages:
            for selector in stage.selectors:
                bias = selector.fc.bias.view(-1, 2)
                if keep is None:
                    selector.fc.weight.normal_(0, 3.0, generator=generator)
                    bias[:, 1] = bias[:, 0]
                else:
                    selector.fc.weight.zero_()
                    bias.copy_(torch.tensor([0., 10.] if keep else [10., 0.]))
    return model


def _run(model, x, mode):
    model.set_inference_mode(mode)
    with torch.no_grad():
        outs = [o.clone() for o in model(x)]
    masks = [m.clone() for m in model.get_masks()]
    model.set_inference_mode('sparse')
    return outs, masks


def _assert_sparse_equals_dense(model, x):
    sparse, sparse_masks = _run(model, x, 'sparse')
    dense, dense_masks = _run(model, x, 'dense')
    assert all(torch.equal(a, b) for a, b in zip(sparse_masks, dense_masks))
    assert len(sparse) == len(dense)
    for index, (a, e) in enumerate(zip(sparse, dense)):
        assert a.shape == e.shape
        assert relative_error(a, e) < 1e-4, (index, relative_error(a, e))
    return sparse_masks


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize('mask_groups,rate,kwargs', [
    (1, 0.4, dict()),
    (2, 0.6, dict(base_stride=4, alpha=1)),
    (4, 0.3, dict(beta=2, **OS8)),
])
def test_sparse_equals_dense_on_odd_sizes_and_random_masks(mask_groups, rate, kwargs):
    model = _eval_model(mask_groups=mask_groups, out_indices=ALL_OUT, **kwargs)
    model.set_mask_override(rate, seed=3)
    masks = _assert_sparse_equals_dense(model, torch.randn(2, 3, 45, 67))
    selected = torch.stack([m.mean() for m in masks])
    assert 0 < float(selected.min()) and float(selected.max()) < 1


@pytest.mark.parametrize('keep', [None, True, False])
def test_sparse_equals_dense_with_learned_masks_all_and_none(keep):
    model = _set_selectors(_eval_model(out_indices=(1, 2, 4, 6), **OS8), keep=keep)
    masks = _assert_sparse_equals_dense(model, torch.randn(1, 3, 53, 41))
    rate = float(torch.cat([m.flatten() for m in masks]).mean())
    assert rate == {True: 1.0, False: 0.0}.get(keep, rate) and (keep is not None or 0 < rate < 1)


@pytest.mark.parametrize('expand_ratio,dilation,act',
                         [(6, 1, 'ReLU6'), (1, 2, 'ReLU'), (3, 3, 'ReLU6')])
def test_sparse_engine_equals_masked_blocks(expand_ratio, dilation, act):
    """The engine alone: masked blocks with a residual, without one, 3x3-first blocks, dilation."""
    torch.manual_seed(0)
    groups = 2
    blocks = [InvertedResidual(8, 8, 1, expand_ratio, dilation=dilation, groups=groups,
                               act_cfg=dict(type=act)),
              InvertedResidual(8, 12, 1, expand_ratio, dilation=dilation, groups=groups,
                               act_cfg=dict(type=act))]
    for block in blocks:
        randomize_norms(block).eval()
        with torch.no_grad():  # large activations so that ReLU6 clips
            block.conv[0].conv.weight.mul_(4)
    x = torch.randn(2, 8, 13, 11) * 3
    masks = (torch.rand(2, 2, groups, 4, 3) < 0.5).float()
    masks[0, 1] = 0  # an image with nothing selected
    masks[1, 0] = 1  # one with everything
    with torch.no_grad():
        expected = x
        for block, mask in zip(blocks, masks):
            expected = block(expected, expand_mask(mask, x.shape[-2:]))
        actual = sparse_inverted_residual_stage(
            x, masks, [b.sparse_weights() for b in blocks], [b.use_res_connect for b in blocks],
            dilation=dilation, clamp=blocks[0].clamp)
    assert [b.use_res_connect for b in blocks] == [True, False]
    assert relative_error(actual, expected) < 1e-4


# ------------------------------------------------------------------ training
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = SARMobileNetV2(**TINY, out_indices=ALL_OUT, beta=2, alpha=2).train()
    outs = model(torch.randn(2, 3, 37, 41))
    loss = sum(o.mean() for o in outs) + model.get_aux_losses()['loss_act_rate']
    loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


def test_deterministic_rate_loss_is_shared_with_sar_resnet():
    torch.manual_seed(0)
    model = SARMobileNetV2(**TINY, out_indices=(4, ), deterministic_rate_weight=0.5).train()
    model(torch.randn(2, 3, 33, 35))
    losses = model.get_aux_losses()
    det = model.get_deterministic_rates()
    assert det.shape == (2, 8) and bool((det == 1).all())  # selectors start selecting all
    expected = 0.5 * ((det.mean(0) - model.target_rate)**2).mean()
    torch.testing.assert_close(losses['loss_act_rate_det'], expected)
    losses['loss_act_rate_det'].backward()
    assert model.layer2.selectors[0].fc.bias.grad is not None
    with pytest.raises(InvalidArgumentError, match='deterministic_rate_weight'):
        SARMobileNetV2(**TINY, deterministic_rate_weight=-1)


def test_with_cp_replays_masks_and_matches_plain_training():
    x = torch.randn(2, 3, 33, 35)
    results = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = SARMobileNetV2(**TINY, out_indices=(4, ), with_cp=with_cp).train()
        model.set_temperature(0.5)
        torch.manual_seed(1)
        out = model(x)[0]
        out.sum().backward()
        results.append((out.detach(), model.get_activation_rates(),
                        model.layer3.selectors[0].conv.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.equal(results[0][1], results[1][1])
    assert torch.allclose(results[0][2], results[1][2], atol=1e-5)


def test_frozen_stages_and_norm_eval():
    model = SARMobileNetV2(**TINY, frozen_stages=2, norm_eval=True).train()
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert not any(p.requires_grad for p in model.layer2.parameters())
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert not model.layer2.training and model.layer3.training
    assert not model.layer3.refine_blocks[0].conv[0].bn.training  # norm_eval


# ------------------------------------------------------------------ contract
@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_builds_in_every_task_scope(scope):
    models = importlib.import_module(f'{scope}.registry').MODELS
    init_default_scope(scope)
    backbone = models.build(dict(type='sar_backbones.SARMobileNetV2', **TINY, mask_groups=2,
                                 out_indices=(1, 2, 4, 6)))
    assert isinstance(backbone, SARMobileNetV2) and backbone.mask_groups == 2


@pytest.mark.parametrize('kwargs', [dict(), OS8])
def test_shapes_and_strides_equal_mmseg_mobilenet_v2(kwargs):
    from mmseg.models.backbones import MobileNetV2
    x = torch.randn(1, 3, 45, 67)
    ours = SARMobileNetV2(**TINY, out_indices=tuple(range(7)), **kwargs).eval()
    reference = MobileNetV2(widen_factor=0.25, out_indices=tuple(range(7)), **kwargs)
    reference.eval()  # mmseg's train() returns None
    with torch.no_grad():
        assert [tuple(o.shape) for o in ours(x)] == [tuple(o.shape) for o in reference(x)]
    # The plain layers are mmseg's, weight for weight (same keys and shapes).
    for name in ('conv1', 'layer1', 'layer6', 'layer7'):
        assert {k: v.shape for k, v in getattr(ours, name).state_dict().items()} == \
            {k: v.shape for k, v in getattr(reference, name).state_dict().items()}


def test_shapes_equal_mmpretrain_mobilenet_v2_with_its_last_conv():
    from mmpretrain.models.backbones import MobileNetV2
    x = torch.randn(1, 3, 64, 64)
    for widen_factor in (0.25, 1.5):
        ours = SARMobileNetV2(widen_factor=widen_factor, patch_grid=None, patch_size=2,
                              out_indices=ALL_OUT).eval()
        reference = MobileNetV2(widen_factor=widen_factor, out_indices=ALL_OUT)
        reference.eval()
        with torch.no_grad():
            assert [tuple(o.shape) for o in ours(x)] == [tuple(o.shape) for o in reference(x)]
    assert not hasattr(SARMobileNetV2(**TINY, out_indices=(6, )), 'conv2')


def test_a_classifier_checkpoint_loads_into_a_segmentation_backbone(tmp_path):
    classifier = SARMobileNetV2(**TINY)  # out_indices=(7,): with conv2
    path = tmp_path / 'cls.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in classifier.state_dict().items()}},
               path)
    seg = SARMobileNetV2(**TINY, out_indices=(1, 2, 4, 6), init_cfg=dict(
        type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    seg.init_weights()
    assert torch.equal(seg.layer3.refine_blocks[0].conv[1].conv.weight,
                       classifier.layer3.refine_blocks[0].conv[1].conv.weight)
    other = SARMobileNetV2(**TINY, out_indices=(1, ), mask_groups=1, init_cfg=dict(
        type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    with pytest.raises(ValueError, match='mask_groups'):
        other.init_weights()


def test_sar_api_is_shared_with_sar_resnet():
    model = _eval_model(out_indices=(4, ))
    assert isinstance(model, SARBackboneMixin) and not isinstance(model, SARResNet)
    with torch.no_grad():
        with model.temporary_settings(mask_rate=0.0):
            model(torch.randn(1, 3, 40, 40))
            assert float(model.get_activation_rates().max()) == 0
    assert model.num_masked_blocks == 1 + 2 + 3 + 2
    model.set_temperature(0.3)
    assert model.temperature == 0.3


@pytest.mark.parametrize('kwargs', [dict(), dict(beta=2, alpha=1, base_stride=4, **OS8)])
def test_deployed_equals_undeployed_in_both_modes(kwargs):
    model = _set_selectors(_eval_model(out_indices=ALL_OUT, **kwargs))
    x = torch.randn(2, 3, 45, 51)
    expected, masks = _run(model, x, 'dense')
    assert 0 < float(torch.cat([m.flatten() for m in masks]).mean()) < 1
    assert model.switch_to_deploy() is model and model.deployed
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for mode in ('sparse', 'dense'):
        actual, deployed_masks = _run(model, x, mode)
        assert all(torch.equal(a, b) for a, b in zip(masks, deployed_masks))
        for a, e in zip(actual, expected):
            assert relative_error(a, e) < 1e-4, mode
    with pytest.raises(RuntimeError, match='deployed'):
        model.train()


def test_deploy_refuses_what_it_cannot_fold():
    model = SARMobileNetV2(**TINY, norm_cfg=dict(type='GN', num_groups=2),
                           inference_mode='dense').eval()
    with pytest.raises(TypeError, match='GroupNorm'):
        model.switch_to_deploy()
    assert not model.deployed
    with pytest.raises(RuntimeError, match='eval'):
        SARMobileNetV2(**TINY).switch_to_deploy()


@pytest.mark.parametrize('kwargs,match', [
    (dict(widen_factor=0), 'widen_factor'),
    (dict(mask_groups=3), 'mask_groups'),
    (dict(alpha=0), 'alpha'),
    (dict(beta=-1), 'beta'),
    (dict(base_stride=3), 'base_stride'),
    (dict(patch_size=(2, 2)), 'patch_size'),
    (dict(strides=(1, 2, 2)), 'strides'),
    (dict(dilations=(1, 1, 1, 0, 1, 1, 1)), 'dilations'),
    (dict(out_indices=(8, )), 'out_indices'),
    (dict(frozen_stages=8), 'frozen_stages'),
    (dict(act_cfg=dict(type='GELU')), 'act_cfg'),
    (dict(target_rate=0), 'target_rate'),
    (dict(norm_cfg=dict(type='GN', num_groups=2)), 'inference_mode'),
    (dict(norm_cfg=dict(type='GN', num_groups=3), inference_mode='dense'), 'num_groups=3'),
    (dict(inference_mode='fast'), 'inference_mode'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SARMobileNetV2(**{**TINY, **kwargs})


# ------------------------------------------------------------------ complexity
def _mobilenet_v2_macs_by_hand(size=224, num_classes=1000):
    """Plain MobileNetV2 (widen 1) MACs: stem, inverted residual blocks, conv2, head."""
    side = size // 2
    macs = side * side * 32 * 3 * 9
    width = 32
    for ratio, out, count, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
                                      (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                                      (6, 320, 1, 1)):
        for index in range(count):
            hidden = width * ratio
            if ratio != 1:
                macs += side * side * width * hidden
            side //= stride if index == 0 else 1
            macs += side * side * hidden * 9 + side * side * hidden * out
            width = out
    macs += side * side * width * 1280
    return macs + side * side * 1280 + 1280 * num_classes


def test_count_macs_of_plain_mobilenet_v2_matches_a_hand_count():
    from mmpretrain.models.backbones import MobileNetV2
    reference = MobileNetV2()
    reference.eval()
    counted = count_macs(reference, (3, 224, 224))[0] + 1280 * 49 + 1280 * 1000
    assert counted == _mobilenet_v2_macs_by_hand()
    assert abs(counted / 1e9 - 0.3) < 0.01  # MobileNetV2's published 300 MFLOPs


def test_complexity_in_the_paper_convention_matches_a_hand_count():
    model = SARMobileNetV2(mask_groups=2, base_stride=2, alpha=2, beta=1)
    cost = model_complexity(model, activation_rate=0.5, num_classes=1000)
    # The refine block of layer2 at rate 1 on the 56x56 map (C=24, t=6):
    # expansion 24->144 (G=2), depthwise 3x3 on 144, projection 144->24 (G=2).
    area = 56 * 56
    assert cost['flops_refine'][0] == area * (24 * 144 // 2 + 144 * 9 + 144 * 24 // 2)
    # layer5's refine blocks (14x14, C=96, hidden 576).
    area = 14 * 14
    assert cost['flops_refine'][-1] == area * (96 * 576 // 2 + 576 * 9 + 576 * 96 // 2)
    assert len(cost['flops_refine']) == 8
    assert cost['flops'] == pytest.approx(cost['flops_static'] + 0.5 * sum(cost['flops_refine']))
    # Parameters of that block: three convs and three BN (weight + bias).
    block = model.layer5.refine_blocks[0]
    by_hand = 96 * 576 // 2 + 576 * 9 + 576 * 96 // 2 + 2 * (576 + 576 + 96)
    assert sum(p.numel() for p in block.parameters()) == by_hand
    # Static part, by hand: a plain MobileNetV2 without the refined blocks'
    # convolutions, plus what SAR adds (base branches, selectors, alignments, gates).
    plain = _mobilenet_v2_macs_by_hand()
    sar_extra = 0
    for stage, (ratio, width, side) in zip(model.sar_stages, ((6, 24, 56), (6, 32, 28),
                                                              (6, 64, 14), (6, 96, 14))):
        base, hidden, bside = width // 2, width * ratio, side // 2
        n = stage.num_masked_blocks
        # 3x3/2 average pooling, then the first base block (width -> C/alpha).
        sar_extra += bside * bside * width * 9
        sar_extra += bside * bside * (width * hidden + hidden * 9 + hidden * base)
        sar_extra += (n - 1) * bside * bside * (base * base * ratio * 2 + base * ratio * 9)
        sar_extra += n * (bside * bside * (base * 8 // 2) * 9 + 8 * bside * bside)  # selectors
        sar_extra += n * (stage.patch_grid ** 2) * 8 * 4 // 2  # selector FCs on the K x K grid
        sar_extra += bside * bside * base * width  # base alignment 1x1
        sar_extra += bside * bside * width + 2 * width * max(width // 16, 1)  # gate: GAP + FCs
        # The dense refine blocks of plain MobileNetV2 that SAR replaces (ungrouped 1x1s).
        sar_extra -= n * side * side * (width * hidden * 2 + hidden * 9)
    assert cost['flops_static'] == plain + sar_extra
    # A segmentation backbone (no conv2): the head reads the last layer (320 channels).
    seg = model_complexity(SARMobileNetV2(out_indices=(1, 2, 4, 6)), num_classes=10)
    no_conv2 = cost['params'] - 320 * 1280 - 2 * 1280 - 1280 * 1000 - 1000
    assert seg['params'] == no_conv2 + 320 * 10 + 10
    assert seg['flops_static'] == cost['flops_static'] - 49 * 320 * 1280 - 1280 * 49 \
        - 1280 * 1000 + 320 * 49 + 320 * 10
    # The README's figures (SAR-MobileNetV2 1.0 G2s2a2b1 at 224, with the head).
    assert round(cost['params'] / 1e6, 2) == 3.54
    assert round(cost['flops_static'] / 1e9, 3) == 0.196
    assert round(cost['flops_dense'] / 1e9, 3) == 0.263
