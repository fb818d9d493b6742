"""The ResNet backbone contract of mmdet 3.3, mmseg 1.2 and mmpretrain 1.2, applied to SARResNet.

Each test follows one upstream ResNet test (``tests/test_models/test_backbones/
test_resnet.py`` of the three libraries): the same arguments and the same
assertions, at narrow widths and small inputs. Where SAR must differ the test
asserts SAR's behaviour and says why: the mask groups ``G`` must divide every
width, the patch grid needs a minimum input size, the refine branch takes no
deformable conv or plugin (its sparse path must stay exact), and the upstream
``AssertionError`` of a wrong option is an ``InvalidArgumentError`` naming it.
"""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmcv.ops import DeformConv2dPack
from mmengine.config import Config
from torch.nn.modules import GroupNorm
from torch.nn.modules.batchnorm import _BatchNorm

from sar_backbones.models import SARResNet
from sar_backbones.models.errors import InvalidArgumentError
from sar_backbones.models.layers import BasicBlock, Bottleneck, ResidualBlock
from tests.models.helpers import randomize_norms, relative_error

# Narrow, fast models: stage widths 16/32/64/128 (x4 for depth 50).
NARROW = dict(stem_channels=16, base_channels=16, patch_size=2)
DCN = dict(type='DCN', deform_groups=1, fallback_on_stride=False)
CONTEXT = dict(cfg=dict(type='ContextBlock', ratio=1. / 16), position='after_conv3')
GEN_ATTENTION = dict(cfg=dict(type='GeneralizedAttention', spatial_range=-1, num_heads=8,
                              attention_type='0010', kv_stride=2), position='after_conv2')


def check_norm_state(modules, train_state: bool) -> bool:
    return all(m.training == train_state for m in modules if isinstance(m, _BatchNorm))


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (GroupNorm, _BatchNorm))


def all_zeros(module: nn.Module) -> bool:
    return all(bool((p == 0).all()) for p in module.parameters())


def refine_ids(model: SARResNet) -> set:
    return {id(b) for stage in model.sar_stages for b in stage.refine_blocks}


def plain_blocks(stage: nn.Module):
    """The blocks of a SAR stage that are plain ResNet blocks (not the refine branch)."""
    return [b for b in (stage.entry, *stage.base_blocks, stage.exit) if b is not None]


def shapes(feats):
    return [tuple(f.shape) for f in feats]


# ------------------------------------------------------------------ blocks
def test_basic_block_refuses_dcn_and_plugins_like_upstream():
    with pytest.raises(InvalidArgumentError, match='dcn is not implemented for BasicBlock'):
        BasicBlock(64, 64, dcn=DCN)
    for plugin in (CONTEXT, GEN_ATTENTION):
        with pytest.raises(InvalidArgumentError,
                           match='plugins are not implemented for BasicBlock'):
            BasicBlock(64, 64, plugins=[plugin])

    block = BasicBlock(32, 32)
    assert block.conv1.in_channels == 32 and block.conv1.out_channels == 32
    assert block.conv1.kernel_size == (3, 3)
    assert block.conv2.in_channels == 32 and block.conv2.out_channels == 32
    assert block.conv2.kernel_size == (3, 3)
    assert block(torch.randn(1, 32, 14, 14)).shape == (1, 32, 14, 14)


def test_bottleneck_plugin_errors_like_upstream():
    with pytest.raises(InvalidArgumentError, match='plugin position must be one of'):
        Bottleneck(64, 64, plugins=[dict(CONTEXT, position='after_conv4')])
    with pytest.raises(InvalidArgumentError, match="duplicate plugin name 'context_block'"):
        Bottleneck(64, 64, plugins=[CONTEXT, CONTEXT])
    with pytest.raises(KeyError):
        Bottleneck(64, 64, plugins=[dict(cfg=dict(type='WrongPlugin'), position='after_conv3')])


def test_bottleneck_style_and_dcn():
    # Upstream Bottleneck(64, 64) is (inplanes, planes); here (in_channels, out_channels).
    block = Bottleneck(64, 256, stride=2)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # 'pytorch' style
    with pytest.raises(InvalidArgumentError, match='conv_cfg must be None when dcn'):
        Bottleneck(64, 256, dcn=DCN, conv_cfg=dict(type='Conv'))
    block = Bottleneck(64, 256, dcn=DCN)
    assert isinstance(block.conv2, DeformConv2dPack)
    assert block(torch.randn(1, 64, 8, 8)).shape == (1, 256, 8, 8)
    # fallback_on_stride keeps a plain conv where the block strides.
    strided = Bottleneck(64, 256, stride=2, dcn=dict(DCN, fallback_on_stride=True))
    assert type(strided.conv2) is nn.Conv2d
    assert isinstance(Bottleneck(64, 256, dcn=dict(DCN, fallback_on_stride=True)).conv2,
                      DeformConv2dPack)


def test_bottleneck_plugins_like_upstream():
    x = torch.randn(1, 64, 12, 12)
    block = Bottleneck(64, 64, plugins=[CONTEXT])
    assert block.context_block.in_channels == 64
    assert block(x).shape == (1, 64, 12, 12)

    block = Bottleneck(64, 64, plugins=[GEN_ATTENTION])
    assert block.gen_attention_block.in_channels == 16
    assert block(x).shape == (1, 64, 12, 12)

    block = Bottleneck(64, 64, plugins=[
        GEN_ATTENTION, dict(cfg=dict(type='NonLocal2d'), position='after_conv2'), CONTEXT])
    assert block.gen_attention_block.in_channels == 16
    assert block.nonlocal_block.in_channels == 16
    assert block.context_block.in_channels == 64
    assert block(x).shape == (1, 64, 12, 12)

    block = Bottleneck(64, 64, plugins=[
        dict(cfg=dict(type='ContextBlock', ratio=1. / 16, postfix=1), position='after_conv2'),
        dict(cfg=dict(type='ContextBlock', ratio=1. / 16, postfix=2), position='after_conv3'),
        dict(cfg=dict(type='ContextBlock', ratio=1. / 16, postfix=3), position='after_conv3')])
    assert block.context_block1.in_channels == 16
    assert block.context_block2.in_channels == 64
    assert block.context_block3.in_channels == 64
    assert block(x).shape == (1, 64, 12, 12)


def test_plugins_run_where_upstream_runs_them():
    """after_conv2: after norm2 + ReLU; after_conv3: after norm3, before the residual sum."""
    torch.manual_seed(0)
    block = randomize_norms(Bottleneck(64, 64, plugins=[
        dict(cfg=dict(type='ContextBlock', ratio=1. / 16, postfix=1), position='after_conv2'),
        dict(cfg=dict(type='ContextBlock', ratio=1. / 16, postfix=2), position='after_conv3')]))
    for layer in (block.context_block1, block.context_block2):
        nn.init.normal_(layer.channel_add_conv[-1].weight, std=0.1)  # not the zero init
    block.eval()
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.context_block1(block.relu(block.bn2(block.conv2(out))))
        out = block.context_block2(block.bn3(block.conv3(out)))
        torch.testing.assert_close(block(x), (out + x).relu())


# ------------------------------------------------------------- backbone
def test_backbone_errors_like_upstream():
    with pytest.raises(KeyError):
        SARResNet(20)
    for num_stages in (0, 5):
        with pytest.raises(InvalidArgumentError, match='num_stages must be 4'):
            SARResNet(50, num_stages=num_stages)
    with pytest.raises(InvalidArgumentError, match='stage_with_dcn must hold 4 bools'):
        SARResNet(50, dcn=DCN, stage_with_dcn=(True, ))
    with pytest.raises(InvalidArgumentError, match="a plugin's stages must hold 4 bools"):
        SARResNet(50, plugins=[dict(CONTEXT, stages=(False, True, True))])
    with pytest.raises(InvalidArgumentError, match='strides and dilations need 4 values'):
        SARResNet(50, strides=(1, ), dilations=(1, 1))
    with pytest.raises(TypeError, match='pretrained must be a checkpoint path'):
        SARResNet(50, pretrained=0)
    with pytest.raises(InvalidArgumentError, match="style must be 'pytorch'"):
        SARResNet(50, style='tensorflow')
    # 'caffe' is a real ResNet style; SAR refuses it and says why.
    with pytest.raises(InvalidArgumentError, match='Caffe-converted ResNet weights'):
        SARResNet(50, style='caffe')


def test_norm_eval_and_frozen_stages():
    model = SARResNet(50, norm_eval=True, **NARROW)
    model.train()
    assert check_norm_state(model.modules(), False)

    model = SARResNet(50, frozen_stages=1, **NARROW)
    model.train()
    assert model.bn1.training is False
    for layer in (model.conv1, model.bn1, model.layer1):
        for mod in layer.modules():
            if isinstance(mod, _BatchNorm):
                assert mod.training is False
        assert all(p.requires_grad is False for p in layer.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())

    # V1d (deep stem) with the first stage frozen.
    model = SARResNet(50, frozen_stages=1, deep_stem=True, avg_down=True, **NARROW)
    assert len(model.stem) == 9
    model.train()
    assert check_norm_state(model.stem.modules(), False)
    assert all(p.requires_grad is False for p in model.stem.parameters())
    assert all(p.requires_grad is False for p in model.layer1.parameters())


def test_stem_channels_like_mmdet():
    model = SARResNet(50, stem_channels=None, base_channels=16, patch_size=2)
    assert model.conv1.out_channels == 16 and model.bn1.num_features == 16
    assert model.layer1.base_blocks[0].conv1.in_channels == 16
    model = SARResNet(50, stem_channels=32, base_channels=16, patch_size=2)
    assert model.conv1.out_channels == 32 and model.bn1.num_features == 32
    assert model.layer1.base_blocks[0].conv1.in_channels == 32
    assert model.layer1.refine_blocks[0].conv1.in_channels == 32
    # V1d: the first two stem convs are half as wide.
    model = SARResNet(50, stem_channels=12, base_channels=16, deep_stem=True, patch_size=2)
    assert [model.stem[i].out_channels for i in (0, 3, 6)] == [6, 6, 12]
    assert [model.stem[i].num_features for i in (1, 4, 7)] == [6, 6, 12]
    assert model.layer1.base_blocks[0].conv1.in_channels == 12
    # SAR differs: G must divide the stem width, which feeds the grouped refine branch.
    with pytest.raises(InvalidArgumentError, match=r'mask_groups \(G=2\) must divide'):
        SARResNet(50, stem_channels=3, base_channels=16, patch_size=2)


@pytest.mark.parametrize('depth,widths', [(18, (16, 32, 64, 128)), (50, (64, 128, 256, 512))])
def test_forward_shapes_and_out_indices(depth, widths):
    model = SARResNet(depth, **NARROW).train()
    feat = model(torch.randn(1, 3, 64, 64))
    assert shapes(feat) == [(1, w, 64 // s, 64 // s) for w, s in zip(widths, (4, 8, 16, 32))]
    model = SARResNet(depth, out_indices=(0, 1, 2), **NARROW).train()
    assert shapes(model(torch.randn(1, 3, 64, 64))) == [
        (1, w, 64 // s, 64 // s) for w, s in zip(widths[:3], (4, 8, 16))]
    model = SARResNet(depth, out_indices=(3, ), **NARROW).train()
    assert shapes(model(torch.randn(1, 3, 64, 64))) == [(1, widths[3], 2, 2)]


def test_minimum_input_is_a_clear_error():
    # Upstream ResNet runs on 32x32; a 14/7/2 patch grid needs a larger input.
    model = SARResNet(18, stem_channels=16, base_channels=16).train()
    with pytest.raises(ValueError, match='too small for SAR stage 1.*feed at least'):
        model(torch.randn(1, 3, 32, 32))


def test_norms_are_batchnorm_by_default():
    model = SARResNet(50, **NARROW)
    assert all(isinstance(m, _BatchNorm) for m in model.modules() if is_norm(m))


def test_groupnorm_like_upstream():
    # mmseg's test: ResNet-18 with GN 32 at its real widths (SAR G=2, alpha=2: widths of 32).
    model = SARResNet(18, norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
                      inference_mode='dense', patch_size=4)
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
    # The selectors normalise their 4G hidden channels with one group per mask group.
    assert all(s.norm.num_groups == 2 and s.norm.num_channels == 8
               for stage in model.sar_stages for s in stage.selectors)
    model.train()
    feat = model(torch.randn(1, 3, 64, 64))
    assert shapes(feat) == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    # mmdet's test: ResNet-50, base_channels=4, GN 2 groups (SAR: stem 8 for G).
    model = SARResNet(50, stem_channels=8, base_channels=4, patch_size=2, inference_mode='dense',
                      norm_cfg=dict(type='GN', num_groups=2, requires_grad=True)).train()
    assert all(isinstance(m, GroupNorm) for m in model.modules() if is_norm(m))
    assert shapes(model(torch.randn(1, 3, 64, 64))) == [
        (1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]


def test_groupnorm_errors_name_the_layer_and_the_dense_path():
    gn = dict(type='GN', num_groups=32, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match='num_groups=32 must divide.*the stem has 16'):
        SARResNet(50, norm_cfg=gn, inference_mode='dense', **NARROW)
    with pytest.raises(InvalidArgumentError, match="needs inference_mode='dense'.*set_inference"):
        SARResNet(18, norm_cfg=gn, patch_size=4)
    model = SARResNet(18, norm_cfg=gn, inference_mode='dense', patch_size=4).eval()
    with pytest.raises(InvalidArgumentError, match="needs inference_mode='dense'"):
        model.set_inference_mode('sparse')
    with pytest.raises(TypeError, match='GroupNorm'):
        model.switch_to_deploy()
    assert not model.deployed


def test_plugins_in_backbone_like_upstream():
    """Upstream's plugin layout; in a SAR stage the plain blocks take the plugins."""
    plugins = [
        dict(GEN_ATTENTION, stages=(False, True, True, True)),
        dict(cfg=dict(type='NonLocal2d'), position='after_conv2'),
        dict(CONTEXT, stages=(False, True, True, False))]
    model = SARResNet(50, plugins=plugins, stem_channels=8, base_channels=8, patch_size=2)
    for index in range(3):
        stage = model.sar_stages[index]
        for block in plain_blocks(stage):
            mid = block.specs[0].out_channels
            assert block.nonlocal_block.in_channels == mid
            assert hasattr(block, 'gen_attention_block') == (index > 0)
            assert hasattr(block, 'context_block') == (index > 0)
            if index > 0:
                assert block.context_block.in_channels == block.out_channels
        for block in stage.refine_blocks:  # the refine branch stays exact: no plugins
            assert not block.with_plugins and not hasattr(block, 'nonlocal_block')
    for block in model.layer4:
        assert block.nonlocal_block.in_channels == 64
        assert block.gen_attention_block.in_channels == 64
        assert not hasattr(block, 'context_block')
    model.train()
    assert shapes(model(torch.randn(1, 3, 64, 64))) == [
        (1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
    # The sparse path runs: only plain blocks carry plugins.
    randomize_norms(model).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with model.temporary_settings(inference_mode='dense'):
            expected = model(x)
        actual = model(x)
    assert all(relative_error(a, e) < 1e-5 for a, e in zip(actual, expected))


def test_dcn_stages_and_sparse_path():
    model = SARResNet(50, dcn=DCN, stage_with_dcn=(False, True, True, True), **NARROW)
    assert not any(isinstance(m, DeformConv2dPack) for m in model.layer1.modules())
    for stage in model.sar_stages[1:]:
        assert all(isinstance(b.conv2, DeformConv2dPack) for b in plain_blocks(stage))
        assert all(type(b.conv2) is nn.Conv2d for b in stage.refine_blocks)
    assert all(isinstance(b.conv2, DeformConv2dPack) for b in model.layer4)
    # Offsets start at zero (mmcv's own init), so a DCN block starts as the plain conv.
    assert all(all_zeros(m.conv_offset) for m in model.modules()
               if isinstance(m, DeformConv2dPack))
    randomize_norms(model).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        sparse = model(x)
        with model.temporary_settings(inference_mode='dense'):
            dense = model(x)
    assert all(relative_error(a, e) < 1e-5 for a, e in zip(sparse, dense))
    with pytest.raises(TypeError, match='deformable conv.*keep the model undeployed'):
        model.switch_to_deploy()
    assert not model.deployed and type(model.bn1) is not nn.Identity  # nothing folded


def test_refine_blocks_refuse_dcn_and_plugins_when_masked():
    block = Bottleneck(64, 64, groups=2, dcn=DCN)
    mask = torch.ones(1, 2, 8, 8)
    with pytest.raises(ValueError, match='cannot run masked.*sparse path'):
        block(torch.randn(1, 64, 8, 8), mask)
    with pytest.raises(ValueError, match='cannot run masked'):
        Bottleneck(64, 64, groups=2, plugins=[CONTEXT]).eval().sparse_weights()


def test_zero_init_residual():
    model = SARResNet(50, zero_init_residual=True, **NARROW)
    model.init_weights()
    refine = refine_ids(model)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    for block in blocks:
        # SAR differs for the refine blocks on purpose (see SARResNet._reset_parameters).
        assert all_zeros(block.last_norm) == (id(block) not in refine)
    assert shapes(model.train()(torch.randn(1, 3, 64, 64)))[0] == (1, 64, 16, 16)
    model = SARResNet(50, zero_init_residual=False, **NARROW)
    model.init_weights()
    assert not any(all_zeros(m.last_norm) for m in model.modules()
                   if isinstance(m, ResidualBlock))


def test_v1d_forward():
    model = SARResNet(50, deep_stem=True, avg_down=True, stem_channels=16, base_channels=2 * 8,
                      patch_size=2).train()
    assert model.stem(torch.randn(1, 3, 64, 64)).shape == (1, 16, 32, 32)
    assert shapes(model(torch.randn(1, 3, 64, 64))) == [
        (1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]


# ------------------------------------------------------------ mmpretrain
def test_expansion_like_mmpretrain():
    with pytest.raises(InvalidArgumentError, match='expansion must be None or 1'):
        SARResNet(18, expansion=2, **NARROW)
    with pytest.raises(InvalidArgumentError, match='expansion must be None or 4'):
        SARResNet(50, expansion=2, **NARROW)
    assert SARResNet(50, expansion=4, **NARROW).stage_channels == (64, 128, 256, 512)


def test_drop_path_like_mmpretrain():
    model = SARResNet(50, drop_path_rate=0.5, **NARROW)
    # Rates rise linearly over the 16 depth positions of ResNet-50; a base block and
    # the refine block beside it share one.
    expected = torch.linspace(0, 0.5, 16).tolist()
    order = []
    for stage in model.sar_stages:
        order += ([stage.entry] if stage.entry is not None else [])
        order += list(zip(stage.base_blocks, stage.refine_blocks))
        order += ([stage.exit] if stage.exit is not None else [])
    order += list(model.layer4)
    assert len(order) == 16

    def rate(block):
        return 0.0 if block.drop_path is None else block.drop_path.drop_prob

    for rate_expected, entry in zip(expected, order):
        for block in entry if isinstance(entry, tuple) else (entry, ):
            assert rate(block) == pytest.approx(rate_expected)
    model.train()
    assert shapes(model(torch.randn(2, 3, 64, 64)))[3] == (2, 512, 2, 2)
    with pytest.raises(InvalidArgumentError, match=r'drop_path_rate must be a number in \[0, 1\)'):
        SARResNet(50, drop_path_rate=1.0, **NARROW)


def test_drop_path_keeps_eval_and_sparse_path_exact():
    torch.manual_seed(0)
    plain = randomize_norms(SARResNet(18, **NARROW)).eval()
    torch.manual_seed(0)
    dropped = randomize_norms(SARResNet(18, drop_path_rate=0.3, **NARROW)).eval()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, e in zip(dropped(x), plain(x)):
            torch.testing.assert_close(a, e)
    # In training whole residual branches are dropped per sample.
    block = dropped.layer4[1]
    block.train()
    torch.manual_seed(1)
    y = torch.randn(64, block.in_channels, 2, 2)
    out = block(y)
    kept_identity = torch.isclose(out, y.relu()).flatten(1).all(1)
    assert 0 < int(kept_identity.sum()) < 64


# ----------------------------------------------------------------- mmseg
def test_multi_grid_and_contract_dilation_like_mmseg():
    model = SARResNet(50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), multi_grid=(1, 2, 4),
                      **NARROW)
    assert [b.conv2.dilation for b in model.layer4] == [(4, 4), (8, 8), (16, 16)]
    model = SARResNet(50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True,
                      **NARROW)
    assert [b.conv2.dilation for b in model.layer4] == [(2, 2), (4, 4), (4, 4)]
    assert model.layer3.entry.conv2.dilation == (1, 1)
    assert all(b.conv2.dilation == (2, 2) for b in model.layer3.refine_blocks)
    model.train()
    assert shapes(model(torch.randn(1, 3, 64, 64)))[3] == (1, 512, 8, 8)
    for grid in ((1, 2), (1, 0, 2), 'abc'):
        with pytest.raises(InvalidArgumentError, match='multi_grid must'):
            SARResNet(50, multi_grid=grid, **NARROW)


# --------------------------------------------------------------- with_cp
def _train_step(model, x, seed):
    torch.manual_seed(seed)
    outs = model(x)
    loss = sum(o.square().mean() for o in outs)
    rate_loss = model.get_aux_losses()['loss_act_rate']
    (loss + rate_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    masks = [m.detach() for m in model.get_masks()]
    return [o.detach() for o in outs], rate_loss.detach(), masks, grads


def test_with_cp_same_outputs_rate_loss_masks_and_gradients():
    torch.manual_seed(0)
    plain = SARResNet(50, drop_path_rate=0.2, **NARROW).train()
    checkpointed = SARResNet(50, drop_path_rate=0.2, with_cp=True, **NARROW).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.with_cp
    x = torch.randn(2, 3, 64, 64)
    expected = _train_step(plain, x, seed=3)
    calls = []
    # Pre-hooks: a recomputation stops right after the last saved tensor it
    # needs, before a block's forward hooks would run.
    hooks = [block.register_forward_pre_hook(lambda *_: calls.append(1))
             for block in (checkpointed.layer1.refine_blocks[0], checkpointed.layer4[0])]
    actual = _train_step(checkpointed, x, seed=3)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 4  # each block ran again in the backward pass
    for a, e in zip(actual[0], expected[0]):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(actual[1], expected[1])
    for a, e in zip(actual[2], expected[2]):
        assert torch.equal(a, e)
    assert actual[3].keys() == expected[3].keys()
    for name, grad in expected[3].items():
        torch.testing.assert_close(actual[3][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_with_cp_is_off_in_eval_and_without_grad():
    model = SARResNet(18, with_cp=True, **NARROW).eval()
    calls = []
    model.layer4[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 1


# ----------------------------------------- mmdet config shapes, one training step
def _det_model(backbone_options: dict, neck_norm: dict = None):
    """The shipped SAR Faster R-CNN with an upstream config's backbone options, narrow."""
    from tests.models.integration.sar_task_configs import FASTER_RCNN
    cfg = Config.fromfile(str(FASTER_RCNN))
    backbone = cfg.model.backbone
    backbone.update(dict(dict(init_cfg=None, frozen_stages=-1, norm_eval=False,
                              patch_size=(2, 2, 2)), **backbone_options))
    width = backbone.get('base_channels', 64) * 4
    cfg.model.neck.in_channels = [width, width * 2, width * 4, width * 8]
    cfg.model.neck.out_channels = 32
    cfg.model.rpn_head.in_channels = cfg.model.rpn_head.feat_channels = 32
    cfg.model.roi_head.bbox_roi_extractor.out_channels = 32
    cfg.model.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64)
    if neck_norm is not None:
        cfg.model.neck.norm_cfg = neck_norm
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    return MODELS.build(cfg.model)


def _det_train_step(model):
    from mmdet.structures import DetDataSample
    from mmengine.optim import OptimWrapper
    from mmengine.structures import InstanceData
    torch.manual_seed(0)
    samples = []
    for _ in range(2):
        sample = DetDataSample(metainfo=dict(img_shape=(96, 128), ori_shape=(96, 128),
                                             pad_shape=(96, 128), scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[8., 10., 70., 60.]]),
                                           labels=torch.tensor([3]))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    model.train()
    log_vars = model.train_step(data, optim)
    assert torch.isfinite(log_vars['loss']) and 'loss_act_rate' in log_vars
    changed = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])]
    return log_vars, changed


def _mmdet_config(name: str) -> Config:
    """A config shipped with the installed mmdet (its ``.mim/configs``)."""
    import mmdet
    return Config.fromfile(str(Path(mmdet.__file__).parent / '.mim' / 'configs' / name))


def _upstream_backbone(name: str) -> dict:
    """The backbone options an mmdet config sets, SAR's type in place of ResNet's."""
    backbone = copy.deepcopy(_mmdet_config(name).model.backbone.to_dict())
    assert backbone.pop('type') in ('ResNet', 'ResNetV1d')
    backbone.pop('init_cfg', None)
    return backbone


def test_mmdet_dcn_c3_c5_config_trains_with_sar():
    backbone = _upstream_backbone('dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py')
    assert backbone['stage_with_dcn'] == (False, True, True, True)
    model = _det_model(dict(backbone, stem_channels=16, base_channels=16))
    assert sum(isinstance(m, DeformConv2dPack) for m in model.backbone.modules()) > 0
    _det_train_step(model)
    # The first step only moves the zero-initialised last norms (zero_init_residual),
    # the second reaches the deformable offsets through them.
    _, changed = _det_train_step(model)
    assert any('conv_offset' in n for n in changed)


def test_mmdet_gn_all_config_trains_with_sar():
    cfg = _mmdet_config('gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py')
    backbone = _upstream_backbone('gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py')
    assert backbone['norm_cfg']['type'] == 'GN' and backbone['norm_cfg']['num_groups'] == 32
    # Widths of 32 everywhere: alpha=1 keeps the base bottleneck at 32 channels.
    model = _det_model(dict(backbone, stem_channels=32, base_channels=32, alpha=1,
                            inference_mode='dense'), neck_norm=cfg.model.neck.norm_cfg)
    assert all(isinstance(m, GroupNorm) for m in model.backbone.modules() if is_norm(m))
    _, changed = _det_train_step(model)
    assert any('selectors' in n for n in changed)


def test_mmdet_with_cp_and_v1d_configs_train_with_sar():
    model = _det_model(dict(with_cp=True, stem_channels=16, base_channels=16))
    assert model.backbone.with_cp
    _det_train_step(model)
    # ResNetV1d = deep_stem + avg_down (mmdet's ResNetV1d defaults).
    model = _det_model(dict(deep_stem=True, avg_down=True, stem_channels=16, base_channels=16))
    assert len(model.backbone.stem) == 9
    _det_train_step(model)
