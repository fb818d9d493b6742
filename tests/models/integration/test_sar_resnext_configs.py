"""The SAR-ResNeXt configs: they say what their names say, and each trains a step on tiny data."""
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from sar_backbones.models import SARResNeXt
from sar_backbones.registry import MODELS
from .sar_task_configs import CONFIGS, tiny_cls_config, tiny_det_config

CLASSIFIERS = sorted((CONFIGS / 'sar_resnext').glob('*.py'))
DETECTOR = CONFIGS / 'faster_rcnn' / 'faster-rcnn_sar-x101-32x4d-g2s2a2b1-t0.5_fpn_1x_coco.py'
EVERY = CLASSIFIERS + [DETECTOR]
# Model-zoo baselines each config cites: mmpretrain ResNeXt top-1, mmdet box AP.
BASELINES = {'sar-resnext50': '77.90', 'sar-resnext101': '78.61', 'faster-rcnn': '41.2'}
# The OpenMMLab config each one inherits (the brief of issue 19).
BASES = {'sar-resnext50': 'mmpretrain::resnext/resnext50-32x4d_8xb32_in1k.py',
         'sar-resnext101': './sar-resnext50-32x4d-g2s2a2b1-t0.5_8xb32_in1k.py',
         'faster-rcnn': 'mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py'}


def _ids(paths):
    return [p.name for p in paths]


def _key(path):
    return re.match(r'(sar-resnext\d+|faster-rcnn)', path.name).group(1)


def test_configs_are_shipped():
    assert [p.name for p in CLASSIFIERS] == [
        'sar-resnext101-32x4d-g2s2a2b1-t0.5_8xb32_in1k.py',
        'sar-resnext50-32x4d-g2s2a2b1-t0.5_8xb32_in1k.py']
    assert DETECTOR.is_file()


@pytest.mark.parametrize('path', EVERY, ids=_ids(EVERY))
def test_config_matches_its_name_and_base(path):
    text = path.read_text()
    assert BASES[_key(path)] in text and BASELINES[_key(path)] in text
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports == dict(imports=['sar_backbones'], allow_failed_imports=False)
    bb = cfg.model.backbone
    assert bb.type == 'sar_backbones.SARResNeXt'
    depth, groups, width = map(int, re.search(r'(?:resnext|-x)(\d+)-(\d+)x(\d+)d',
                                              path.name).groups())
    g, s, a, b = map(int, re.search(r'g(\d)s(\d)a(\d)b(\d)', path.name).groups())
    t = float(re.search(r'-t(\d\.\d+)', path.name).group(1))
    assert (bb.depth, bb.groups, bb.base_width) == (depth, groups, width)
    assert (bb.mask_groups, bb.base_stride, bb.alpha, bb.beta, bb.target_rate) == (g, s, a, b, t)
    assert bb.rate_loss == 'batch' and bb.rate_loss_weight == 0.5
    assert [h.type for h in cfg.custom_hooks][:2] == ['sar_backbones.SARTemperatureHook',
                                                      'sar_backbones.SARTargetRateHook']
    if path == DETECTOR:
        assert cfg.default_scope == 'mmdet' and cfg.model.type == 'sar_backbones.SARFasterRCNN'
        assert bb.patch_grid is None and tuple(bb.patch_size) == (4, 4, 7)
        assert (bb.frozen_stages, bb.norm_eval) == (1, True)
        assert list(cfg.model.neck.in_channels) == [256, 512, 1024, 2048]
        assert bb.init_cfg.checkpoint == \
            'checkpoints/sar-resnext101-32x4d-g2s2a2b1_in1k_backbone.pth'
        assert cfg.train_cfg.max_epochs == 12
    else:
        assert cfg.default_scope == 'mmpretrain'
        assert cfg.model.type == 'sar_backbones.SARImageClassifier'
        assert tuple(bb.patch_grid) == (14, 7, 2) and tuple(bb.out_indices) == (3, )
        assert cfg.model.head.in_channels == 2048
        assert cfg.train_cfg.max_epochs == 110


@pytest.mark.parametrize('path', EVERY, ids=_ids(EVERY))
def test_one_training_step(path, tiny_data, tmp_path):
    make_cfg = tiny_det_config if path == DETECTOR else tiny_cls_config
    cfg = make_cfg(path, tiny_data, tmp_path)
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    assert isinstance(model.backbone, SARResNeXt)
    loader = Runner.build_dataloader(cfg.train_dataloader)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    data = model.data_preprocessor(next(iter(loader)), True)
    losses = model(**data, mode='loss')
    rate_loss = losses['loss_act_rate']
    backbone = model.backbone
    rates = backbone.get_activation_rates()
    expected = backbone.rate_loss_weight * ((rates.mean(0) - backbone.target_rate)**2).mean()
    torch.testing.assert_close(rate_loss.detach(), expected)
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    # One step moves the refine branch's grouped 3x3 weights (stage 2: never frozen).
    conv2 = backbone.layer2.refine_blocks[0].conv2
    assert conv2.groups == 32
    before = conv2.weight.detach().clone()
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert not torch.equal(before, conv2.weight.detach())
