"""ImageNet checkpoint -> tools/model_converters/sar2backbone.py -> task backbones."""

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from sar_backbones.engine import swap_sync_bn
from sar_backbones.models.backbones.checkpoint import EXTRA_STATE_KEY, decode_architecture
from sar_backbones.models.integration import BackboneCheckpointMismatchError, load_checkpoint_file
from sar_backbones.registry import MODELS
from ..script_loading import load_script
from .sar_tool_helpers import CONFIGS, write_tiny_cls_config

FASTER_RCNN = CONFIGS / 'faster_rcnn' / 'faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'
DEEPLABV3 = (CONFIGS / 'deeplabv3' /
             'deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py')


def _converter():
    return load_script('tools/model_converters/sar2backbone.py')


def _pretrain(shipped, data_root, tmp_path):
    """One short ImageNet-style epoch with a shipped config: a real checkpoint."""
    config = write_tiny_cls_config(shipped, data_root, tmp_path / 'cls.py')
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(tmp_path / 'pretrain')
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 10
    Runner.from_cfg(cfg).train()
    return tmp_path / 'pretrain' / 'epoch_1.pth'


def _build(config, checkpoint, **backbone):
    cfg = Config.fromfile(str(config))
    swap_sync_bn(cfg.model)
    cfg.model.backbone.init_cfg.checkpoint = str(checkpoint)
    cfg.model.backbone.update(backbone)
    init_default_scope(cfg.default_scope)
    return MODELS.build(cfg.model)


def _assert_backbone_equals(model, pretrain_ckpt):
    state = load_checkpoint_file(pretrain_ckpt)['state_dict']
    pretrained = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(pretrained)
    for key, value in loaded.items():
        assert torch.equal(value, pretrained[key]), key


@pytest.mark.parametrize('task', ['detection', 'segmentation'])
def test_pretrained_weights_reach_task_backbones(task, imagenet_data, tmp_path):
    if task == 'detection':
        shipped = CONFIGS / 'sar_resnet' / 'sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'
        downstream = FASTER_RCNN
    else:
        # The deep-stem G2s4a1 backbone of the paper's segmentation setting.
        shipped = CONFIGS / 'sar_resnet' / 'sar-resnetv1c50-g2s4a1b1-t0.5_8xb32_in1k.py'
        downstream = DEEPLABV3
    pretrain_ckpt = _pretrain(shipped, imagenet_data, tmp_path)
    # A training checkpoint holds message-hub and numpy state that PyTorch's
    # default refuses; the package's loader allows exactly those types.
    with pytest.raises(Exception):
        torch.load(pretrain_ckpt, map_location='cpu', weights_only=True)
    assert 'message_hub' in load_checkpoint_file(pretrain_ckpt)

    dst = tmp_path / 'checkpoints' / 'backbone.pth'
    _converter().main([str(pretrain_ckpt), str(dst), '--check-config', str(downstream)])
    converted = torch.load(dst, map_location='cpu')  # PyTorch's default: weights_only
    assert not any(k.startswith(('backbone.', 'head.', 'neck.')) for k in converted['state_dict'])
    meta = converted['meta']
    assert meta['source'] == 'epoch_1.pth' and meta['backbone_cfg']['depth'] == 50
    # The architecture record the backbone checks on loading, also in the meta.
    record = decode_architecture(converted['state_dict'][EXTRA_STATE_KEY])
    assert record == meta['architecture'] and record['depth'] == 50

    model = _build(downstream, dst)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    model.init_weights()
    _assert_backbone_equals(model, pretrain_ckpt)
    # The checkpoint has no neck/head weights; nothing else was overwritten by it.
    assert set(before) == {k for k in model.state_dict() if not k.startswith('backbone.')}

    # The mmpretrain checkpoint itself also loads, with prefix='backbone.'.
    direct = _build(downstream, pretrain_ckpt)
    direct.backbone.init_cfg['prefix'] = 'backbone.'
    direct.backbone.init_weights()
    _assert_backbone_equals(direct, pretrain_ckpt)


def test_mismatched_backbone_fails_with_keys_and_shapes(imagenet_data, tmp_path):
    shipped = CONFIGS / 'sar_resnet' / 'sar-resnet34-g2s2a2b1-t0.5_8xb32_in1k.py'
    pretrain_ckpt = _pretrain(shipped, imagenet_data, tmp_path)
    dst = tmp_path / 'r34_backbone.pth'
    converter = _converter()
    converter.convert(str(pretrain_ckpt), str(dst))

    # Wrong G: same keys, grouped convolutions of another shape.
    model = _build(FASTER_RCNN, dst, depth=34, mask_groups=1)
    with pytest.raises(ValueError, match=r'mask_groups: checkpoint 2 vs model 1; .*shape '
                                         r'mismatch: .*checkpoint \(\d+, \d+'):
        model.init_weights()
    # Wrong depth: ResNet-50 bottlenecks instead of ResNet-34 basic blocks.
    model = _build(FASTER_RCNN, dst)
    with pytest.raises(ValueError, match=r'missing in checkpoint: .*conv3'):
        model.init_weights()

    # The converter's --check-config reports the same before anything is written.
    other = tmp_path / 'g4.py'
    other.write_text(f"_base_ = {str(FASTER_RCNN)!r}\n"
                     "model = dict(backbone=dict(depth=34, mask_groups=4))\n")
    target = tmp_path / 'not_written.pth'
    with pytest.raises(BackboneCheckpointMismatchError) as error:
        converter.convert(str(pretrain_ckpt), str(target), check_config=str(other))
    message = str(error.value)
    assert 'mask_groups=4' in message and 'depth=34' in message
    assert 'shape mismatch' in message and 'vs model' in message
    assert not target.exists()
