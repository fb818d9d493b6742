"""Turn an ImageNet pretraining checkpoint into a backbone-only checkpoint.

The pretraining configs (``configs/sar_resnet/``) train an mmpretrain
``ImageClassifier``; its checkpoint holds ``backbone.*``, ``neck.*`` and
``head.*`` weights plus optimizer and message-hub state that only loads with
``torch.load(..., weights_only=False)``. Detection and segmentation configs
load the backbone alone through
``init_cfg=dict(type='Pretrained', checkpoint=...)``, so this tool keeps the
``backbone.`` weights, strips the prefix and writes
``{'state_dict': ..., 'meta': ...}`` with tensors and plain Python values
only, which loads under PyTorch's default ``weights_only=True``.

``--check-config`` builds the backbone of a downstream config and verifies
that every weight fits (same keys and shapes), failing with the offending
keys if, e.g., depth or G differ.

Example:
    python tools/model_converters/sar2backbone.py \\
        work_dirs/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k/epoch_110.pth \\
        checkpoints/sar-resnet50-g2s2a2b1_in1k_backbone.pth \\
        --check-config configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py

Only convert checkpoints you trust: reading a training checkpoint unpickles it.
"""
import argparse
import os
import os.path as osp
from collections import OrderedDict
from typing import Dict, Optional

import torch

import sar_backbones  # noqa: F401  (registries)
from sar_backbones.models.backbones.checkpoint import extract_state_dict
from sar_backbones.models.integration import check_backbone_state_dict, describe_backbone


def _plain(value):
    """``value`` with config containers turned into weights_only-safe types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _backbone_cfg_of(checkpoint: dict) -> Optional[dict]:
    """The backbone config recorded by mmengine in ``meta['cfg']``, if any."""
    text = checkpoint.get('meta', {}).get('cfg')
    if not isinstance(text, str):
        return None
    from mmengine.config import Config
    try:
        cfg = Config.fromstring(text, file_format='.py')
        return _plain(cfg.model.backbone.to_dict())
    except Exception:  # noqa: BLE001  (informative metadata only)
        return None


def build_backbone_from_config(config: str) -> torch.nn.Module:
    """Build (without initialising) the backbone of a task config.

    Args:
        config (str): Path of a detection, segmentation or classification
            config.

    Returns:
        nn.Module: The backbone, ready for :func:`check_backbone_state_dict`.
    """
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    backbone_cfg = cfg.model.backbone.copy()
    backbone_cfg.pop('init_cfg', None)
    backbone_cfg.pop('pretrained', None)
    return MODELS.build(backbone_cfg)


def convert(src: str,
            dst: str,
            prefix: str = 'backbone.',
            check_config: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Convert ``src`` and write the backbone-only checkpoint ``dst``.

    Args:
        src (str): A pretraining checkpoint (mmengine/mmpretrain format).
        dst (str): Output path.
        prefix (str): Prefix of the backbone keys in ``src``. Defaults to
            ``'backbone.'``; ``''`` keeps every key (re-saving a backbone-only
            checkpoint).
        check_config (str, optional): A config whose backbone must accept the
            weights. Defaults to None.

    Returns:
        dict[str, Tensor]: The written state dict.

    Raises:
        BackboneCheckpointMismatchError: If ``check_config``'s backbone does
            not match.
    """
    # Training checkpoints pickle the message hub and numpy state.
    checkpoint = torch.load(src, map_location='cpu', weights_only=False)
    weights = extract_state_dict(checkpoint, prefix or None)
    state_dict = OrderedDict(
        (key, value.detach().cpu().clone()) for key, value in weights.items())
    if check_config is not None:
        backbone = build_backbone_from_config(check_config)
        check_backbone_state_dict(backbone, state_dict, source=src)
        print(f'{check_config}: all {len(state_dict)} tensors fit '
              f'{describe_backbone(backbone)}')
    meta = dict(source=osp.basename(src), prefix=prefix, converter='sar2backbone')
    source_meta = checkpoint.get('meta', {}) if isinstance(checkpoint, dict) else {}
    for key in ('epoch', 'iter', 'mmengine_version'):
        if key in source_meta:
            meta[key] = _plain(source_meta[key])
    backbone_cfg = _backbone_cfg_of(checkpoint) if isinstance(checkpoint, dict) else None
    if backbone_cfg is not None:
        meta['backbone_cfg'] = backbone_cfg
    if osp.dirname(dst):
        os.makedirs(osp.dirname(dst), exist_ok=True)
    torch.save(dict(state_dict=state_dict, meta=meta), dst)
    # What downstream code will do: a default (weights_only) torch.load.
    torch.load(dst, map_location='cpu', weights_only=True)
    return state_dict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Extract the backbone of a SAR-ResNet pretraining checkpoint')
    parser.add_argument('src', help='pretraining checkpoint (e.g. epoch_110.pth)')
    parser.add_argument('dst', help='output backbone-only checkpoint')
    parser.add_argument(
        '--prefix',
        default='backbone.',
        help="prefix of the backbone keys in SRC (default 'backbone.'; '' keeps all keys)")
    parser.add_argument(
        '--check-config',
        help='a config whose backbone must load the weights (keys and shapes are checked)')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    state_dict = convert(args.src, args.dst, args.prefix, args.check_config)
    params = sum(v.numel() for k, v in state_dict.items() if 'num_batches_tracked' not in k)
    print(f'wrote {args.dst}: {len(state_dict)} tensors, {params / 1e6:.2f} M values')


if __name__ == '__main__':
    main()
