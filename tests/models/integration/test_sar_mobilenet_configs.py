"""The SAR-MobileNetV2 configs say what their names say, and each trains a step on tiny data."""
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from sar_backbones.models import SARMobileNetV2
from sar_backbones.registry import MODELS
from .sar_task_configs import CONFIGS, tiny_cls_config, tiny_seg_config

CLASSIFIER = CONFIGS / 'sar_mobilenet_v2' / 'sar-mobilenet-v2-g2s2a2b1-t0.5_8xb32_in1k.py'
SEGMENTOR = (CONFIGS / 'deeplabv3' /
             'deeplabv3_sar-mobilenet-v2-g2s2a2b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py')
EVERY = [CLASSIFIER, SEGMENTOR]
# The OpenMMLab config each one inherits, and the model-zoo figure it cites.
BASES = {CLASSIFIER: 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py',
         SEGMENTOR: 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py'}
BASELINES = {CLASSIFIER: '71.86', SEGMENTOR: '34.08'}


def test_configs_are_shipped():
    assert sorted(p.name for p in (CONFIGS / 'sar_mobilenet_v2').glob('*.py')) == [CLASSIFIER.name]
    assert SEGMENTOR.is_file()


@pytest.mark.parametrize('path', EVERY, ids=[p.name for p in EVERY])
def test_config_matches_its_name_and_base(path):
    text = path.read_text()
    assert BASES[path] in text and BASELINES[path] in text
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports == dict(imports=['sar_backbones'], allow_failed_imports=False)
    bb = cfg.model.backbone
    assert bb.type == 'sar_backbones.SARMobileNetV2' and bb.widen_factor == 1.0
    g, s, a, b = map(int, re.search(r'g(\d)s(\d)a(\d)b(\d)', path.name).groups())
    t = float(re.search(r'-t(\d\.\d+)', path.name).group(1))
    assert (bb.mask_groups, bb.base_stride, bb.alpha, bb.beta, bb.target_rate) == (g, s, a, b, t)
    assert bb.rate_loss == 'batch' and bb.rate_loss_weight == 0.5
    assert [h.type for h in cfg.custom_hooks][:2] == ['sar_backbones.SARTemperatureHook',
                                                      'sar_backbones.SARTargetRateHook']
    if path == SEGMENTOR:
        assert cfg.default_scope == 'mmseg' and cfg.model.type == 'sar_backbones.SAREncoderDecoder'
        assert cfg.model.pretrained is None
        assert tuple(bb.strides) == (1, 2, 2, 1, 1, 1, 1)
        assert tuple(bb.dilations) == (1, 1, 1, 2, 2, 4, 4)
        assert tuple(bb.out_indices) == (1, 2, 4, 6) and tuple(bb.patch_size) == (4, 4, 7, 7)
        assert (cfg.model.decode_head.in_channels, cfg.model.decode_head.in_index) == (320, 3)
        assert (cfg.model.auxiliary_head.in_channels, cfg.model.auxiliary_head.in_index) == \
            (96, 2)
        assert cfg.model.decode_head.num_classes == 21 and cfg.train_cfg.max_iters == 20000
        assert bb.init_cfg.checkpoint == 'checkpoints/sar-mobilenet-v2-g2s2a2b1_in1k_backbone.pth'
    else:
        assert cfg.default_scope == 'mmpretrain'
        assert cfg.model.type == 'sar_backbones.SARImageClassifier'
        assert tuple(bb.patch_grid) == (14, 7, 2, 2) and tuple(bb.out_indices) == (7, )
        assert cfg.model.head.in_channels == 1280
        assert cfg.train_cfg.max_epochs == 300


@pytest.mark.parametrize('path', EVERY, ids=[p.name for p in EVERY])
def test_one_training_step(path, tiny_data, tmp_path):
    if path == SEGMENTOR:
        cfg = tiny_seg_config(path, tiny_data, tmp_path)
    else:
        cfg = tiny_cls_config(path, tiny_data, tmp_path)
        # 64-pixel images: a 14x14 grid needs a 56-pixel layer-2 map; follow the input instead.
        cfg.model.backbone.update(patch_grid=None, patch_size=(2, 2, 2, 2))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert isinstance(backbone, SARMobileNetV2)
    loader = Runner.build_dataloader(cfg.train_dataloader)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    data = model.data_preprocessor(next(iter(loader)), True)
    losses = model(**data, mode='loss')
    rates = backbone.get_activation_rates()
    assert rates.shape[1] == 8  # masked blocks of layers 2-5: 1 + 2 + 3 + 2
    expected = backbone.rate_loss_weight * ((rates.mean(0) - backbone.target_rate)**2).mean()
    torch.testing.assert_close(losses['loss_act_rate'].detach(), expected)
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    # One step moves the refine branch's depthwise weights.
    conv = backbone.layer3.refine_blocks[0].conv[1].conv
    assert conv.groups == conv.in_channels
    before = conv.weight.detach().clone()
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert not torch.equal(before, conv.weight.detach())
    # Inference on the val pipeline: the sparse path runs in predict mode.
    model.eval()
    batch = next(iter(Runner.build_dataloader(cfg.val_dataloader)))
    with torch.no_grad():
        results = model(**model.data_preprocessor(batch, False), mode='predict')
    assert len(results) == len(batch['data_samples'])
    assert backbone.get_activation_rates().shape[1] == 8
