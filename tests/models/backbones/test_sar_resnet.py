"""SAR-ResNet: paths agree, training signals flow, the OpenMMLab contract holds."""
import pytest
import torch
from mmengine.registry import init_default_scope
from torch.nn.modules.batchnorm import _BatchNorm

from sar_backbones.models import SARResNet
from tests.models.helpers import randomize_norms, relative_error

OS8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True, deep_stem=True)


def _eval_model(**kwargs):
    torch.manual_seed(0)
    return randomize_norms(SARResNet(**kwargs)).eval()


def _both_paths(model, x):
    with torch.no_grad():
        model.set_inference_mode('dense')
        dense = model(x)
        dense_rates = model.get_activation_rates()
        model.set_inference_mode('sparse')
        sparse = model(x)
        assert torch.equal(model.get_activation_rates(), dense_rates)
    return dense, sparse


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('rate', [0.0, 0.4, 1.0])
def test_sparse_equals_dense_whole_backbone(depth, groups, rate):
    model = _eval_model(depth=depth, groups=groups, patch_grid=(8, 4, 2))
    model.set_mask_override(rate, seed=depth + groups)
    dense, sparse = _both_paths(model, torch.randn(2, 3, 128, 128))
    for mask in model.get_masks():  # exactly round(rate * Kh * Kw) patches per image and group
        patches = mask.shape[-2] * mask.shape[-1]
        expected = torch.full(mask.shape[:2], round(rate * patches))
        assert torch.equal(mask.flatten(2).sum(-1), expected)
    for d, s in zip(dense, sparse):
        assert relative_error(s, d) < 1e-4


def _perturb_selectors(model, seed=0):
    """Make the learned masks select only part of the patches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in model.sar_stages:
            for selector in stage.selectors:
                selector.fc.weight.normal_(0, 3.0, generator=generator)
                selector.fc.bias.view(-1, 2)[:, 1] = selector.fc.bias.view(-1, 2)[:, 0]


def test_sparse_equals_dense_learned_masks_and_os8():
    model = _eval_model(depth=50, groups=2, **OS8)
    _perturb_selectors(model)
    dense, sparse = _both_paths(model, torch.randn(1, 3, 160, 192))
    rates = model.get_activation_rates()
    assert 0.05 < float(rates.mean()) < 0.95, 'learned masks should be partial here'
    for d, s in zip(dense, sparse):
        assert relative_error(s, d) < 1e-4


def test_sparse_equals_dense_detection_size_patch_mode():
    # 800x1216 images give 200x304 stage-1 features; patch_size mode follows the size.
    model = _eval_model(depth=18, groups=2, patch_grid=None, patch_size=(4, 4, 7))
    model.set_mask_override(0.5)
    dense, sparse = _both_paths(model, torch.randn(1, 3, 800, 1216))
    assert [tuple(o.shape[-2:]) for o in sparse] == [(200, 304), (100, 152), (50, 76), (25, 38)]
    for d, s in zip(dense, sparse):
        assert relative_error(s, d) < 1e-4


def test_everything_selected_at_init_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = SARResNet(depth=18, groups=2).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model.get_activation_rates(), torch.ones(2, 3))
        second = model(x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    model.train()
    model(x)
    assert float(model.get_activation_rates().mean()) > 0.99


def test_eval_masks_deterministic_with_partial_selection():
    model = _eval_model(depth=18, groups=2)
    _perturb_selectors(model, seed=3)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model(x)
        first = [m.clone() for m in model.get_masks()]
        model(x)
    assert all(torch.equal(a, b) for a, b in zip(first, model.get_masks()))
    assert 0 < float(model.get_activation_rates().mean()) < 1


def test_gradients_reach_mask_generators_through_straight_through_estimator():
    torch.manual_seed(0)
    model = SARResNet(depth=18, groups=2, temperature=5.0).train()
    outs = model(torch.randn(2, 3, 96, 96))
    losses = model.get_aux_losses()
    assert set(losses) >= {'loss_act_rate', 'act_rate', 'act_rate_stage1'}
    (outs[-1].square().mean() + losses['loss_act_rate']).backward()
    for stage in model.sar_stages:
        for selector in stage.selectors:
            for name in ('conv.weight', 'fc.weight', 'fc.bias'):
                grad = selector.get_parameter(name).grad
                assert grad is not None, name
                assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_training_masks_are_sampled_and_binary():
    torch.manual_seed(0)
    model = SARResNet(depth=18, groups=2).train()
    _perturb_selectors(model)
    x = torch.randn(2, 3, 96, 96)
    model(x)
    first = [m.detach().clone() for m in model.get_masks()]
    model(x)
    second = [m.detach() for m in model.get_masks()]
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in second)
    assert any(not torch.equal(a, b) for a, b in zip(first, second)), 'Gumbel noise should vary'


@pytest.mark.parametrize('rate_loss', ['batch', 'sample'])
def test_activation_rate_loss_follows_eq10_eq11(rate_loss):
    model = SARResNet(depth=18, target_rate=0.4, rate_loss=rate_loss, rate_loss_weight=0.5).train()
    model(torch.randn(3, 3, 64, 64))
    rates = model.get_activation_rates()
    if rate_loss == 'batch':
        expected = ((rates.mean(0) - 0.4) ** 2).mean()
    else:
        expected = ((rates - 0.4) ** 2).mean()
    torch.testing.assert_close(model.get_aux_losses()['loss_act_rate'], 0.5 * expected)
    model.set_target_rate(1.0)
    model.eval()
    assert 'loss_act_rate' not in model.get_aux_losses()


@pytest.mark.parametrize('depth,channels', [(18, (64, 128, 256, 512)), (34, (64, 128, 256, 512)),
                                            (50, (256, 512, 1024, 2048)),
                                            (101, (256, 512, 1024, 2048))])
def test_output_strides_and_channels(depth, channels):
    x = torch.randn(1, 3, 64, 96)
    for kwargs, strides in ((dict(), (4, 8, 16, 32)), (OS8, (4, 8, 8, 8))):
        model = SARResNet(depth=depth, patch_grid=(8, 4, 2), **kwargs).eval()
        with torch.no_grad():
            outs = model(x)
        assert [o.shape[1] for o in outs] == list(channels)
        assert [(64 // s, 96 // s) for s in strides] == [tuple(o.shape[-2:]) for o in outs]


def test_out_indices_selects_stages():
    model = SARResNet(depth=18, out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 224, 224))
    assert [o.shape[1] for o in outs] == [128, 512]


def test_frozen_stages_and_norm_eval_behave_like_mmdet_resnet():
    model = SARResNet(depth=18, frozen_stages=2, norm_eval=True)
    model.train()
    for module in [model.conv1, model.bn1, model.layer1, model.layer2]:
        assert all(not p.requires_grad for p in module.parameters())
        assert not module.training
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert model.layer3.training
    # Frozen weights do not move in a training step.
    before = model.layer1.base_blocks[0].conv1.weight.clone()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    model(torch.randn(2, 3, 64, 64))[-1].mean().backward()
    assert model.layer1.base_blocks[0].conv1.weight.grad is None
    assert torch.equal(before, model.layer1.base_blocks[0].conv1.weight)


def test_deep_stem_frozen():
    model = SARResNet(depth=18, deep_stem=True, frozen_stages=0).train()
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert not model.stem.training


@pytest.mark.parametrize('scope,registry',
                         [('mmdet', 'mmdet.registry'), ('mmseg', 'mmseg.registry')])
def test_builds_from_task_registries(scope, registry):
    import importlib
    models = importlib.import_module(registry).MODELS
    init_default_scope(scope)
    backbone = models.build(dict(type='sar_backbones.SARResNet', depth=18, groups=2,
                                 out_indices=(0, 1, 2, 3)))
    assert isinstance(backbone, SARResNet)


def test_pretrained_init_loads_weights_and_rejects_mismatch(tmp_path):
    source = randomize_norms(SARResNet(depth=18, groups=2), seed=5)
    path = tmp_path / 'classifier.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}}, path)
    init_cfg = dict(type='Pretrained', checkpoint=str(path), prefix='backbone.')
    target = SARResNet(depth=18, groups=2, init_cfg=init_cfg)
    target.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    wrong = SARResNet(depth=18, groups=4, init_cfg=init_cfg)
    with pytest.raises(ValueError, match='shape mismatch.*selectors'):
        wrong.init_weights()


def test_sparse_path_with_weights_created_in_inference_mode():
    # Inference tensors have no version counter; the folded-weight cache must cope.
    with torch.inference_mode():
        model = randomize_norms(SARResNet(depth=18, groups=2, patch_grid=(8, 4, 2))).eval()
        model.set_mask_override(0.5)
        x = torch.randn(1, 3, 128, 128)
        sparse = model(x)
        model.set_inference_mode('dense')
        dense = model(x)
    for d, s in zip(dense, sparse):
        assert relative_error(s, d) < 1e-4


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('depth,beta', [(18, 1.0), (50, 1.0), (50, 0.5)])
def test_outputs_keep_the_input_memory_format(memory_format, depth, beta):
    """The sparse refine branch works channels-last, but the backbone must hand
    back maps laid out like its input: mmcv's CPU RoIAlign reads raw NCHW memory
    and returns garbage for NHWC maps (this broke detection mAP once), so NCHW
    images must give NCHW maps; channels-last images give channels-last maps."""
    from mmcv.ops import roi_align
    model = _eval_model(depth=depth, groups=2, beta=beta, patch_grid=(8, 4, 2))
    model.set_mask_override(0.5)
    x = torch.randn(1, 3, 128, 160).contiguous(memory_format=memory_format)
    dense, sparse = _both_paths(model, x)
    rois = torch.tensor([[0.0, 8.0, 12.0, 100.0, 90.0], [0.0, 40.0, 4.0, 150.0, 120.0]])
    for index, (d, s) in enumerate(zip(dense, sparse)):
        for out in (d, s):
            assert out.is_contiguous(memory_format=memory_format), (index, out.stride())
        assert relative_error(s, d) < 1e-4
        if memory_format == torch.channels_last:
            continue  # mmcv's RoIAlign reads NCHW memory whatever the strides
        scale = 1 / 2**(index + 2)
        expected = roi_align(d.contiguous(), rois, (7, 7), scale, 2, 'avg', True)
        assert relative_error(roi_align(s, rois, (7, 7), scale, 2, 'avg', True), expected) < 1e-4


def test_noiseless_training_masks_are_the_inference_masks_and_still_learn():
    model = _eval_model(depth=18, groups=2, patch_grid=(4, 2, 2))
    _perturb_selectors(model, seed=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    inference_masks = model.get_masks()
    model.train()
    for module in model.modules():  # batch statistics would change the logits
        if isinstance(module, _BatchNorm):
            module.eval()
    model.set_noise_scale(0.0)
    assert model.noise_scale == 0.0
    out = model(x)
    for sampled, deterministic in zip(model.get_masks(), inference_masks):
        assert torch.equal(sampled, deterministic)
    loss = sum(o.mean() for o in out) + model.get_aux_losses()['loss_act_rate']
    loss.backward()
    assert all(stage.selectors[0].fc.weight.grad.abs().sum() > 0 for stage in model.sar_stages)
    model.set_noise_scale(1.0)  # the paper's sampling differs from the deterministic masks
    model(x)
    assert any(not torch.equal(s, d) for s, d in zip(model.get_masks(), inference_masks))
    with pytest.raises(ValueError, match='noise scale'):
        model.set_noise_scale(-1.0)
