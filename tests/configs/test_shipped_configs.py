"""Every shipped config parses, builds its model and says what its name says."""
import re
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

from sar_backbones.engine import swap_sync_bn
from sar_backbones.models import SARResNet
from sar_backbones.registry import MODELS

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
# Every config file, whoever ships it (``_base_`` fragments are not runnable).
EVERY = sorted(p for p in CONFIGS.rglob('*.py') if '_base_' not in p.parts)

# Model-zoo baselines each config must cite (from the upstream metafiles).
BASELINES = {
    'faster-rcnn': '37.4',
    'retinanet': '36.5',
    'deeplabv3-20k': '76.17',
    'deeplabv3-40k': '77.68',
    'pspnet-20k': '76.78',
    'pspnet-40k': '77.29',
    'sar-resnet50': '76.55',
    'sar-resnet34': '73.62',
    'sar-resnetv1c50': '77.01',
}
TASK_MODEL = {
    'faster_rcnn': 'sar_backbones.SARFasterRCNN',
    'retinanet': 'sar_backbones.SARRetinaNet',
    'deeplabv3': 'sar_backbones.SAREncoderDecoder',
    'pspnet': 'sar_backbones.SAREncoderDecoder',
    'sar_resnet': 'sar_backbones.SARImageClassifier',
}
# The paper's settings: ImageNet pretraining and the four task families.


def _sar_resnet(path: Path) -> bool:
    """SAR-ResNet's paper configs; SAR-ResNeXt's and SAR-MobileNetV2's are checked in
    tests/models/integration/test_sar_{resnext,mobilenet}_configs.py."""
    return '_sar-x' not in path.name and 'mobilenet' not in path.name


PAPER = sorted(p for family in TASK_MODEL for p in (CONFIGS / family).glob('*.py')
               if _sar_resnet(p))


def _ids(paths):
    return [str(p.relative_to(CONFIGS)) for p in paths]


def _variant(name):
    """Depth, G, s, alpha, beta and t spelled in a config name."""
    depth = int(re.search(r'(?:-r|resnet|resnetv1c)(\d+)', name).group(1))
    g, s, a, b = map(int, re.search(r'g(\d)s(\d)a(\d)b(\d)', name).groups())
    t = float(re.search(r'-t(\d\.\d+)', name).group(1))
    return depth, g, s, a, b, t


def _baseline_key(path):
    family = path.parent.name
    if family == 'sar_resnet':
        return re.match(r'(sar-resnet(?:v1c)?\d+)', path.name).group(1)
    if family in ('deeplabv3', 'pspnet'):
        iters = re.search(r'(\d+k)', path.name).group(1)
        return f'{family}-{iters}'
    return family.replace('_', '-')


def test_paper_configs_are_shipped():
    counts = {family: len([p for p in (CONFIGS / family).glob('*.py') if _sar_resnet(p)])
              for family in TASK_MODEL}
    assert counts == dict(faster_rcnn=2, retinanet=2, deeplabv3=2, pspnet=2, sar_resnet=5)


@pytest.mark.parametrize('path', EVERY, ids=_ids(EVERY))
def test_every_config_parses_and_builds(path):
    cfg = Config.fromfile(str(path))
    assert 'sar_backbones' in cfg.custom_imports['imports']
    assert cfg.default_scope != 'sar_backbones'
    swap_sync_bn(cfg.model)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    assert type(model).__module__.startswith('sar_backbones.')
    backbone = model.backbone
    assert type(backbone).__name__ in ('SARResNet', 'SARResNeXt', 'SARMobileNetV2')
    if isinstance(backbone, SARResNet) and hasattr(backbone, 'depth'):
        widths = (256, 512, 1024, 2048) if backbone.depth >= 50 else (64, 128, 256, 512)
        assert tuple(backbone.stage_channels) == widths
    # The loss mixin relies on the backbone API.
    assert callable(model.backbone.get_aux_losses)


@pytest.mark.parametrize('path', PAPER, ids=_ids(PAPER))
def test_paper_config_matches_its_name_and_recipe(path):
    text = path.read_text()
    cfg = Config.fromfile(str(path))
    family = path.parent.name
    assert cfg.custom_imports == dict(imports=['sar_backbones'], allow_failed_imports=False)
    assert cfg.default_scope in ('mmdet', 'mmseg', 'mmpretrain')
    assert cfg.model.type == TASK_MODEL[family]
    assert cfg.model.backbone.type == 'sar_backbones.SARResNet'
    assert 'Baseline' in text and BASELINES[_baseline_key(path)] in text

    hooks = [h.type for h in cfg.custom_hooks]
    assert hooks == ['sar_backbones.SARTemperatureHook', 'sar_backbones.SARTargetRateHook',
                     'sar_backbones.SARRateLoggerHook', 'sar_backbones.SARRateSyncHook',
                     'sar_backbones.SARNoiseSeedHook']
    assert cfg.custom_hooks[0].start == 1.0 and cfg.custom_hooks[0].end == 0.01
    assert tuple(cfg.custom_hooks[1].milestones) == (30 / 110, 45 / 110, 60 / 110)

    depth, groups, base_stride, alpha, beta, target = _variant(path.name)
    bb = cfg.model.backbone
    assert (bb.depth, bb.mask_groups, bb.base_stride, bb.alpha, bb.beta, bb.target_rate) == \
        (depth, groups, base_stride, alpha, beta, target)
    assert bb.rate_loss == 'batch' and bb.rate_loss_weight == 0.5

    # Output widths of the stages (what the necks and heads must take); the
    # built backbone's are checked in test_every_config_parses_and_builds.
    channels = (256, 512, 1024, 2048) if depth >= 50 else (64, 128, 256, 512)

    if family in ('faster_rcnn', 'retinanet'):
        assert bb.patch_grid is None and tuple(bb.patch_size) == (4, 4, 7)
        assert tuple(bb.out_indices) == (0, 1, 2, 3)
        assert list(cfg.model.neck.in_channels) == list(channels)
        init = bb.init_cfg
        assert init.type == 'Pretrained'
        assert init.checkpoint == f'checkpoints/sar-resnet50-g{groups}s{base_stride}a{alpha}b' \
            f'{beta}_in1k_backbone.pth'
        assert cfg.train_cfg.max_epochs == 12
    elif family in ('deeplabv3', 'pspnet'):
        # SyncBN stays in the shipped file for GPU training.
        assert bb.norm_cfg.type == 'SyncBN' == cfg.model.decode_head.norm_cfg.type
        assert cfg.model.pretrained is None
        assert tuple(bb.strides) == (1, 2, 1, 1) and tuple(bb.dilations) == (1, 1, 2, 4)
        assert bb.contract_dilation and bb.deep_stem
        assert bb.patch_grid is None and tuple(bb.patch_size) == (4, 4, 7)
        assert cfg.model.decode_head.in_channels == channels[cfg.model.decode_head.in_index]
        assert cfg.model.auxiliary_head.in_channels == \
            channels[cfg.model.auxiliary_head.in_index]
        assert bb.init_cfg.checkpoint == \
            'checkpoints/sar-resnetv1c50-g2s4a1b1_in1k_backbone.pth'
        iters = int(re.search(r'(\d+)k', path.name).group(1)) * 1000
        assert cfg.train_cfg.max_iters == iters
        assert cfg.param_scheduler[0].end == iters
        assert cfg.model.decode_head.num_classes == 21
    else:
        assert tuple(bb.patch_grid) == (14, 7, 2)
        assert tuple(bb.out_indices) == (3, )
        assert cfg.model.head.in_channels == channels[3]
        assert cfg.model.head.loss.type == 'LabelSmoothLoss'
        assert cfg.model.head.loss.label_smooth_val == 0.1
        opt = cfg.optim_wrapper.optimizer
        assert (opt.type, opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == \
            ('SGD', 0.1, 0.9, 1e-4, True)
        # lr 0.1 x batch / 256 with 8 x 32 images.
        assert cfg.train_dataloader.batch_size * 8 == 256 == cfg.auto_scale_lr.base_batch_size
        warmup, cosine = cfg.param_scheduler
        assert (warmup.type, warmup.begin, warmup.end) == ('LinearLR', 0, 5)
        assert (cosine.type, cosine.begin, cosine.end, cosine.T_max) == \
            ('CosineAnnealingLR', 5, 110, 105)
        assert cfg.train_cfg.max_epochs == 110
        train_steps = {s.type: s for s in cfg.train_dataloader.dataset.pipeline}
        val_steps = {s.type: s for s in cfg.val_dataloader.dataset.pipeline}
        assert train_steps['RandomResizedCrop'].scale == 224
        assert val_steps['ResizeEdge'].scale == 256 and val_steps['CenterCrop'].crop_size == 224
        assert bb.get('deep_stem', False) == ('resnetv1c' in path.name)


@pytest.mark.parametrize('family', ['deeplabv3', 'pspnet'])
def test_20k_and_40k_segmentation_models_are_identical(family):
    cfg20, cfg40 = (Config.fromfile(str(next((CONFIGS / family).glob(f'*-{n}k_*.py'))))
                    for n in (20, 40))
    assert cfg20.model.to_dict() == cfg40.model.to_dict()
    assert cfg20.custom_hooks == cfg40.custom_hooks
    assert (cfg20.train_cfg.max_iters, cfg40.train_cfg.max_iters) == (20000, 40000)


@pytest.mark.parametrize('family', ['faster_rcnn', 'retinanet'])
def test_detection_variants_differ_only_in_base_stride(family):
    s2, s4 = (Config.fromfile(str(next((CONFIGS / family).glob(f'*_sar-r50-g2s{s}a2b1-*.py'))))
              for s in (2, 4))
    bb2, bb4 = s2.model.backbone.to_dict(), s4.model.backbone.to_dict()
    assert (bb2.pop('base_stride'), bb4.pop('base_stride')) == (2, 4)
    assert bb2.pop('init_cfg') != bb4.pop('init_cfg')
    assert bb2 == bb4
