"""SAR-ResNeXt: exact sparse path, deploy, gradients, registries, mmdet's ResNeXt contract, cost."""
import copy
import importlib
import warnings

import pytest
import torch
from mmengine.registry import init_default_scope

from sar_backbones.analysis.complexity import count_macs, model_complexity
from sar_backbones.inference.deploy import deploy_backbone
from sar_backbones.models import SARResNet, SARResNeXt
from sar_backbones.models.backbones.arguments import InvalidArgumentError
from sar_backbones.models.layers.resnext_block import (ResNeXtBlockType, ResNeXtBottleneck,
                                                       resnext_width)
from tests.models.helpers import randomize_norms, relative_error

# A narrow SAR-ResNeXt-50 (stage widths 64/128/256/512): cardinality 8, so
# with G=2 each mask group owns 4 cardinality groups of 2 channels (stage 1).
TINY = dict(depth=50, stem_channels=16, base_channels=16, groups=8, base_width=2)
OS8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True, deep_stem=True)


def _eval_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_norms(SARResNeXt(**{**TINY, **kwargs}), seed=seed).eval()


def _perturb_selectors(model, seed=0):
    """Learned masks that select part of the patches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in model.sar_stages:
            for selector in stage.selectors:
                selector.fc.weight.normal_(0, 3.0, generator=generator)
                selector.fc.bias.view(-1, 2)[:, 1] = selector.fc.bias.view(-1, 2)[:, 0]
    return model


def _force_selection(model, keep):
    with torch.no_grad():
        for stage in model.sar_stages:
            for selector in stage.selectors:
                selector.fc.weight.zero_()
                selector.fc.bias.view(-1, 2).copy_(torch.tensor([0., 10.] if keep else [10., 0.]))
    return model


def _run(model, x, mode):
    model.set_inference_mode(mode)
    with torch.no_grad():
        outs = [o.clone() for o in model(x)]
    masks = [m.clone() for m in model.get_masks()]
    model.set_inference_mode('sparse')
    return outs, masks


def _assert_close(actual, expected, tolerance=1e-4):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, index
        assert relative_error(a, e) < tolerance, (index, relative_error(a, e))


# ------------------------------------------------------------------ structure
def test_refine_convs_are_grouped_by_mask_group_and_cardinality():
    model = SARResNeXt(**TINY, mask_groups=2)
    for stage in model.sar_stages:
        for block in stage.refine_blocks:
            assert isinstance(block, ResNeXtBottleneck)
            assert (block.conv1.groups, block.conv2.groups, block.conv3.groups) == (2, 8, 2)
        for block in stage.base_blocks:  # plain ResNeXt blocks at C/alpha
            assert (block.conv1.groups, block.conv2.groups, block.conv3.groups) == (1, 8, 1)
            assert block.conv2.out_channels == resnext_width(block.out_channels, 8, 2, 16)
    # ResNeXt's width rule at C/alpha for the base branch and at C elsewhere.
    assert model.layer1.base_blocks[0].conv2.out_channels == 8  # floor(32/4 * 2/16) * 8
    assert model.layer1.refine_blocks[0].conv2.out_channels == 16
    assert model.layer4[0].conv2.out_channels == 128 and model.layer4[0].conv2.groups == 8


def test_a_mask_group_owns_its_cardinality_groups():
    """Changing group 1's channels never reaches group 0's outputs (masked or not)."""
    torch.manual_seed(0)
    block = randomize_norms(ResNeXtBottleneck(32, 32, groups=2, cardinality=8, base_width=2,
                                              base_channels=16)).eval()
    x = torch.randn(1, 32, 9, 11)
    pixel_mask = (torch.rand(1, 2, 9, 11) > 0.5).float()  # (B, G, H, W)
    changed = x.clone()
    changed[:, 16:] += torch.randn(1, 16, 9, 11)
    with torch.no_grad():
        for m in (None, pixel_mask):
            a, b = block(x, m), block(changed, m)
            assert torch.equal(a[:, :16], b[:, :16])
            assert not torch.equal(a[:, 16:], b[:, 16:])


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize('mask_groups', [1, 2, 4])
@pytest.mark.parametrize('rate', [0.0, 0.37, 1.0])
def test_sparse_equals_dense_on_odd_sizes_and_random_masks(mask_groups, rate):
    model = _eval_model(seed=mask_groups, mask_groups=mask_groups, patch_grid=(8, 4, 2))
    model.set_mask_override(rate, seed=mask_groups)
    x = torch.randn(2, 3, 97, 131)
    dense, dense_masks = _run(model, x, 'dense')
    sparse, sparse_masks = _run(model, x, 'sparse')
    assert all(torch.equal(a, b) for a, b in zip(dense_masks, sparse_masks))
    for mask in sparse_masks:
        patches = mask.shape[-2] * mask.shape[-1]
        assert torch.equal(mask.flatten(2).sum(-1),
                           torch.full(mask.shape[:2], round(rate * patches)))
    _assert_close(sparse, dense)


@pytest.mark.parametrize('keep', [True, False])
def test_sparse_equals_dense_with_learned_masks_os8_and_all_or_nothing(keep):
    model = _perturb_selectors(_eval_model(seed=3, mask_groups=2, **OS8))
    x = torch.randn(1, 3, 83, 109)
    dense, _ = _run(model, x, 'dense')
    sparse, _ = _run(model, x, 'sparse')
    assert 0.05 < float(model.get_activation_rates().mean()) < 0.95, 'masks should be partial'
    _assert_close(sparse, dense)
    _force_selection(model, keep)
    dense, _ = _run(model, x, 'dense')
    sparse, _ = _run(model, x, 'sparse')
    assert float(model.get_activation_rates().mean()) == float(keep)
    _assert_close(sparse, dense)


def test_sparse_equals_dense_in_patch_size_mode():
    model = _eval_model(seed=4, mask_groups=2, patch_grid=None, patch_size=(4, 4, 7))
    model.set_mask_override(0.5, seed=1)
    x = torch.randn(1, 3, 150, 210)
    dense, _ = _run(model, x, 'dense')
    sparse, _ = _run(model, x, 'sparse')
    _assert_close(sparse, dense)


@pytest.mark.parametrize('kwargs', [dict(), OS8])
def test_deployed_equals_undeployed_in_both_modes(kwargs):
    model = _perturb_selectors(_eval_model(seed=5, mask_groups=2, **kwargs), seed=5)
    deployed = copy.deepcopy(model).switch_to_deploy()
    assert deployed.deployed and deployed.layer1.refine_blocks[0].conv2.groups == 8
    x = torch.randn(2, 3, 97, 75)
    reference, masks = _run(model, x, 'dense')
    assert 0 < float(model.get_activation_rates().mean()) < 1
    for mode in ('dense', 'sparse'):
        outs, deployed_masks = _run(deployed, x, mode)
        assert all(torch.equal(a, b) for a, b in zip(deployed_masks, masks))
        _assert_close(outs, reference)
    with pytest.raises(RuntimeError, match='deploy'):
        deployed.train()


def test_deployed_backbone_traces_in_one_graph():
    """The refine op takes the cardinality-grouped weights: no graph break under torch.compile."""
    model = _eval_model(seed=7, patch_grid=(8, 4, 2)).switch_to_deploy()
    model.set_mask_override(0.5)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(1, 3, 97, 131))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_deploy_backbone_is_the_same_step():
    model = _eval_model(seed=6)
    deploy_backbone(model)
    assert model.deployed
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


# ------------------------------------------------------------------ training
def test_gradients_reach_selectors_and_every_cardinality_group():
    torch.manual_seed(0)
    model = SARResNeXt(**TINY, mask_groups=2, temperature=5.0).train()
    outs = model(torch.randn(2, 3, 64, 64))
    losses = model.get_aux_losses()
    assert losses['loss_act_rate'].requires_grad
    (outs[-1].square().mean() + losses['loss_act_rate']).backward()
    for stage in model.sar_stages:
        for selector in stage.selectors:
            for name in ('conv.weight', 'fc.weight', 'fc.bias'):
                grad = selector.get_parameter(name).grad
                assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        for block in stage.refine_blocks:
            grad = block.conv2.weight.grad  # (out, in/cardinality, 3, 3): one row per channel
            assert grad is not None and bool((grad.flatten(1).abs().sum(1) > 0).all())


def test_frozen_stages_and_norm_eval():
    model = SARResNeXt(**TINY, frozen_stages=1, norm_eval=True)
    model.train()
    assert not model.layer1.training and not any(p.requires_grad
                                                 for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_resnet_block_options_reach_the_resnext_blocks():
    """dcn (mmdet's x101 dconv configs) and drop_path_rate go to the ResNeXt blocks."""
    model = SARResNeXt(**TINY, dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
                       stage_with_dcn=(False, False, False, True), drop_path_rate=0.1)
    conv2 = model.layer4[0].conv2
    assert type(conv2).__name__ == 'ModulatedDeformConv2dPack' and conv2.groups == 8
    assert all(type(b.conv2) is torch.nn.Conv2d for s in model.sar_stages for b in s.refine_blocks)
    outs = model.train()(torch.randn(2, 3, 64, 64))
    outs[-1].mean().backward()
    assert conv2.weight.grad is not None
    assert model.layer4[0].drop_path is not None and model.layer1.entry is None


def test_plugins_reach_the_plain_resnext_blocks_only():
    plugin = dict(cfg=dict(type='ContextBlock', ratio=1. / 4), position='after_conv3',
                  stages=(False, True, True, True))
    model = SARResNeXt(**TINY, plugins=[plugin])
    with_plugin = [b for s in model.sar_stages[1:] for b in (s.entry, *s.base_blocks)]
    with_plugin += list(model.layer4)
    assert all(b.plugin_names[2] == ('context_block', ) for b in with_plugin if b is not None)
    assert all(not b.with_plugins for s in model.sar_stages for b in s.refine_blocks)
    assert not any(b.with_plugins for b in model.layer1.base_blocks)
    # The plugin sees the ResNeXt block's output width.
    assert model.layer4[0].context_block.in_channels == 512
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[-1].shape == (1, 512, 2, 2)


def test_mid_width_is_the_resnext_rule():
    block = ResNeXtBlockType(32, 4)
    assert block.mid_width(256) == 128 and block.mid_width(2048) == 1024
    assert ResNeXtBlockType(8, 2, base_channels=16).mid_width(64) == 16


# ------------------------------------------------------------------ contract
@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_builds_in_every_task_scope(scope):
    models = importlib.import_module(f'{scope}.registry').MODELS
    init_default_scope(scope)
    backbone = models.build(dict(type='sar_backbones.SARResNeXt', **TINY, mask_groups=2,
                                 out_indices=(0, 1, 2, 3)))
    assert isinstance(backbone, SARResNeXt) and isinstance(backbone, SARResNet)
    assert backbone.cardinality == 8 and backbone.mask_groups == 2


def test_shapes_and_strides_equal_mmdet_resnext():
    from mmdet.models.backbones import ResNeXt
    x = torch.randn(1, 3, 64, 96)
    for kwargs in (dict(), dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))):
        ours = SARResNeXt(depth=50, groups=32, base_width=4, patch_grid=(8, 4, 2),
                          **kwargs).eval()
        reference = ResNeXt(depth=50, groups=32, base_width=4, **kwargs)
        reference.eval()
        with torch.no_grad():
            expected = [tuple(o.shape) for o in reference(x)]
            assert [tuple(o.shape) for o in ours(x)] == expected
        # Stage 4 is a plain ResNeXt stage: the same weights as mmdet's.
        assert [tuple(p.shape) for p in ours.layer4.parameters()] == \
            [tuple(p.shape) for p in reference.layer4.parameters()]
    # Depth 101: mmdet's 3/4/23/3 blocks (a SAR stage of n blocks has n-1 masked ones).
    deep = SARResNeXt(**{**TINY, 'depth': 101})
    assert [stage.num_masked_blocks for stage in deep.sar_stages] == [2, 3, 22]
    assert len(deep.layer4) == 3


def test_groups_is_cardinality_not_the_deprecated_alias():
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no DeprecationWarning about `groups`
        model = SARResNeXt(**{**TINY, 'groups': 4}, mask_groups=4)
    assert model.cardinality == 4 and model.mask_groups == 4
    assert model.architecture()['type'] == 'SARResNeXt'
    assert model.architecture()['groups'] == 4 and model.architecture()['base_width'] == 2
    # mmpretrain spells base_width width_per_group.
    assert SARResNeXt(**{**TINY, 'base_width': 4}).base_width == \
        SARResNeXt(**{k: v for k, v in TINY.items() if k != 'base_width'},
                   width_per_group=4).base_width == 4


@pytest.mark.parametrize('kwargs,match', [
    (dict(depth=152), 'depth'),
    (dict(depth=18), 'depth'),
    (dict(groups=6, mask_groups=4), r'groups \(cardinality, 6\) must be a multiple of mask_groups'),
    (dict(groups=0), r'groups \(ResNeXt cardinality\)'),
    (dict(groups=8.0), r'groups \(ResNeXt cardinality\)'),
    (dict(base_width='2'), 'base_width'),
    (dict(base_width=1, alpha=4), 'no middle channel'),
    (dict(mask_groups=0), r'mask_groups \(G\)'),
    (dict(width_per_group=8, base_width=2), 'width_per_group'),
    (dict(base_channels=0), 'base_channels'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((InvalidArgumentError, KeyError), match=match):
        SARResNeXt(**{**TINY, **kwargs})


def test_checkpoint_of_another_cardinality_is_refused():
    from sar_backbones.models.backbones.checkpoint import BackboneCheckpointMismatchError
    source = SARResNeXt(**{**TINY, 'groups': 4}, mask_groups=2).state_dict()
    with pytest.raises(BackboneCheckpointMismatchError):
        SARResNeXt(**TINY, mask_groups=2).load_state_dict(source)


# ------------------------------------------------------------------ complexity
def _resnext_macs_by_hand(depth, cardinality, base_width, size=224, num_classes=1000):
    """Plain ResNeXt MACs from the architecture (7x7 stem, 3x3 max pool, bottlenecks, head)."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    side = size // 2
    macs = side * side * 64 * 3 * 49  # stem conv
    side //= 2
    macs += side * side * 64 * 9  # max pool
    in_width = 64
    for stage, count in enumerate(blocks):
        out = 256 * 2**stage
        mid = (out // 4 * base_width // 64) * cardinality
        for index in range(count):
            stride = 2 if index == 0 and stage > 0 else 1
            in_side, side = side, side // stride
            macs += in_side * in_side * in_width * mid  # conv1 (1x1, at the input size)
            macs += side * side * mid * (mid // cardinality) * 9  # conv2 (grouped 3x3)
            macs += side * side * mid * out  # conv3
            if index == 0:
                macs += side * side * in_width * out  # downsample 1x1
            in_width = out
    return macs + side * side * in_width + in_width * num_classes  # global pool + fc


def test_count_macs_counts_grouped_convs_like_a_hand_count():
    from mmdet.models.backbones import ResNeXt
    reference = ResNeXt(depth=50, groups=32, base_width=4)
    reference.eval()
    counted = count_macs(reference, (3, 224, 224))[0] + 2048 * 7 * 7 + 2048 * 1000
    assert counted == _resnext_macs_by_hand(50, 32, 4)
    assert abs(counted / 1e9 - 4.23) < 0.01  # the published 4.23 GFLOPs of ResNeXt-50 32x4d


def test_complexity_in_the_paper_convention_matches_a_hand_count():
    model = SARResNeXt(depth=50, groups=32, base_width=4, mask_groups=2, base_stride=2, alpha=2,
                       beta=1)
    cost = model_complexity(model, activation_rate=0.5, num_classes=1000)
    # The first refine block of stage 1 at rate 1 on the 56x56 map:
    # conv1 64->128 (G=2 groups), conv2 128->128 3x3 (32 groups), conv3 128->256 (G=2).
    area = 56 * 56
    first = area * (128 * 64 // 2 + 128 * (128 // 32) * 9 + 256 * 128 // 2)
    assert cost['flops_refine'][0] == first
    # Stage 3's refine blocks (14x14, width 1024, middle 512 in 32 groups).
    area = 14 * 14
    stage3 = area * (512 * 1024 // 2 + 512 * (512 // 32) * 9 + 1024 * 512 // 2)
    assert cost['flops_refine'][-1] == stage3
    assert cost['flops'] == pytest.approx(cost['flops_static'] + 0.5 * sum(cost['flops_refine']))
    # Parameters of that block by hand: three convs, three BN (weight + bias), the
    # shortcut's 1x1 conv 64->256 + BN.
    block = model.layer1.refine_blocks[0]
    by_hand = 64 * 128 // 2 + 128 * 4 * 9 + 128 * 256 // 2 + 2 * (128 + 128 + 256) \
        + 64 * 256 + 2 * 256
    assert sum(p.numel() for p in block.parameters()) == by_hand
    # The README's figures (SAR-ResNeXt-50 32x4d G2s2a2b1 at 224, with the head).
    assert round(cost['params'] / 1e6, 2) == 24.79
    assert round(cost['flops_static'] / 1e9, 3) == 2.016
    assert round(cost['flops_dense'] / 1e9, 3) == 3.099
