"""Turn an ImageNet pretraining checkpoint into a backbone-only checkpoint.

The pretraining configs (``configs/sar_resnet/``) train an mmpretrain
``ImageClassifier``; its checkpoint holds ``backbone.*``, ``neck.*`` and
``head.*`` weights plus optimizer and message-hub state. Detection and
segmentation configs load the backbone alone through
``init_cfg=dict(type='Pretrained', checkpoint=...)``, so this tool keeps the
``backbone.`` weights, strips the prefix and writes
``{'state_dict': ..., 'meta': ...}`` with tensors and plain Python values
only, which loads under PyTorch's default ``weights_only=True``.

The output carries the backbone's architecture record (``_extra_state``: depth,
G, base stride s, alpha, beta, stem, widths), taken from the checkpoint or
rebuilt from the training config it stores; a backbone whose architecture
differs refuses these weights when they are loaded, even where the shapes
agree. ``meta['architecture']`` shows the same record.

``--check-config`` builds the backbone of a downstream config and verifies
that every weight fits (same keys, shapes and architecture), failing with the
differences if, e.g., depth or G differ.

The source is read with weights-only unpickling (plus the types mmengine
checkpoints hold); the output is written to a temporary file next to it and
renamed when complete, never over the source, and over an existing file only
with ``--overwrite``.

Example:
    python tools/model_converters/sar2backbone.py \\
        work_dirs/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k/epoch_110.pth \\
        checkpoints/sar-resnet50-g2s2a2b1_in1k_backbone.pth \\
        --check-config configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py
"""
import argparse
import os
import os.path as osp
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

import sar_backbones  # noqa: F401  (registries, safe checkpoint loading)
from sar_backbones.models.backbones.checkpoint import (EXTRA_STATE_KEY,
                                                       BackboneCheckpointMismatchError,
                                                       CheckpointReadError,
                                                       check_backbone_state_dict,
                                                       decode_architecture, describe_backbone,
                                                       extract_state_dict, load_checkpoint_file)
from sar_backbones.utils.cli import ArgumentParser, check_output_file

__all__ = ['convert', 'build_backbone_from_config', 'check_backbone_state_dict', 'main']


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
    meta = checkpoint.get('meta')
    text = meta.get('cfg') if isinstance(meta, dict) else None
    if not isinstance(text, str):
        return None
    from mmengine.config import Config
    try:
        cfg = Config.fromstring(text, file_format='.py')
        return _plain(cfg.model.backbone.to_dict())
    except Exception:  # noqa: BLE001  (informative metadata only)
        return None


def _architecture_from_cfg(backbone_cfg: Optional[dict],
                           weights: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The architecture record of a checkpoint written before records existed.

    Rebuilds the backbone from the training config stored in the checkpoint
    and keeps its record only if the weights fit that backbone exactly.
    """
    if not backbone_cfg or not str(backbone_cfg.get('type', '')).endswith('SARResNet'):
        return None
    from sar_backbones.models import SARResNet
    kwargs = {k: v for k, v in backbone_cfg.items()
              if k not in ('type', 'init_cfg', 'pretrained')}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # e.g. the deprecated ``groups`` alias
            backbone = SARResNet(**kwargs)
        check_backbone_state_dict(backbone, weights)
    except Exception:  # noqa: BLE001  (no record then: keys and shapes are still checked)
        return None
    return backbone.get_extra_state()


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


def _same_file(a: str, b: str) -> bool:
    try:
        if osp.exists(a) and osp.exists(b):
            return osp.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def _save_atomically(obj: Any, dst: str) -> None:
    """``torch.save`` to a temporary file beside ``dst``, check it, then rename it to ``dst``.

    A failure (full disk, interruption, a file that would not load) leaves
    no partial ``dst`` behind, and an existing ``dst`` untouched.
    """
    directory = osp.dirname(osp.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(dst)}.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
        # What downstream code will do: a default (weights_only) torch.load.
        torch.load(tmp, map_location='cpu', weights_only=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not a checkpoint's mode
        os.replace(tmp, dst)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def convert(src: str,
            dst: str,
            prefix: str = 'backbone.',
            check_config: Union[str, Sequence[str], None] = None,
            overwrite: bool = False) -> Dict[str, torch.Tensor]:
    """Convert ``src`` and write the backbone-only checkpoint ``dst``.

    Args:
        src (str): A pretraining checkpoint (mmengine/mmpretrain format).
        dst (str): Output path; never ``src`` itself.
        prefix (str): Prefix of the backbone keys in ``src``. Defaults to
            ``'backbone.'``; ``''`` keeps every key (re-saving a backbone-only
            checkpoint).
        check_config (str | Sequence[str], optional): Configs whose backbones
            must accept the weights. Defaults to None.
        overwrite (bool): Replace an existing ``dst``. Defaults to False.

    Returns:
        dict[str, Tensor]: The written state dict (with the architecture
        record under ``_extra_state`` when one is known).

    Raises:
        ValueError: If ``dst`` is ``src``.
        FileExistsError: If ``dst`` exists and ``overwrite`` is False.
        CheckpointReadError: If ``src`` cannot be read or holds no weights
            under ``prefix``.
        BackboneCheckpointMismatchError: If a ``check_config``'s backbone does
            not fit. Nothing is written in any of these cases.
    """
    if _same_file(src, dst):
        raise ValueError(f'the output {dst} is the input checkpoint {src}; choose another '
                         'output path (the converter never writes over its input)')
    if osp.isdir(dst):
        raise IsADirectoryError(f'the output {dst} is a directory, not a file')
    if osp.exists(dst) and not overwrite:
        raise FileExistsError(f'the output {dst} exists; pass --overwrite to replace it')
    checkpoint = load_checkpoint_file(src)
    weights = extract_state_dict(checkpoint, prefix or None, source=src)
    state_dict = OrderedDict(
        (key, value.detach().cpu().clone()) for key, value in weights.items())
    backbone_cfg = _backbone_cfg_of(checkpoint)
    if EXTRA_STATE_KEY not in state_dict:
        record = _architecture_from_cfg(backbone_cfg, state_dict)
        if record is not None:
            state_dict[EXTRA_STATE_KEY] = record
    for config in [check_config] if isinstance(check_config, str) else check_config or ():
        backbone = build_backbone_from_config(config)
        check_backbone_state_dict(backbone, state_dict, source=src)
        print(f'{config}: all {_num_weights(state_dict)} tensors fit '
              f'{describe_backbone(backbone)}')
    meta = dict(source=osp.basename(src), prefix=prefix, converter='sar2backbone')
    source_meta = checkpoint.get('meta')
    if isinstance(source_meta, dict):
        for key in ('epoch', 'iter', 'mmengine_version'):
            if key in source_meta:
                meta[key] = _plain(source_meta[key])
    if backbone_cfg is not None:
        meta['backbone_cfg'] = backbone_cfg
    if EXTRA_STATE_KEY in state_dict:
        meta['architecture'] = decode_architecture(state_dict[EXTRA_STATE_KEY])
    _save_atomically(dict(state_dict=state_dict, meta=meta), dst)
    return state_dict


def _num_weights(state_dict: Dict[str, torch.Tensor]) -> int:
    return sum(1 for key in state_dict if key != EXTRA_STATE_KEY)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description='Extract the backbone of a SAR-ResNet pretraining checkpoint')
    parser.add_argument('src', help='pretraining checkpoint (e.g. epoch_110.pth)')
    parser.add_argument('dst', help='output backbone-only checkpoint (never SRC itself)')
    parser.add_argument(
        '--prefix',
        default='backbone.',
        help="prefix of the backbone keys in SRC (default 'backbone.'; '' keeps all keys)")
    parser.add_argument(
        '--check-config', nargs='+', metavar='CONFIG',
        help='configs whose backbones must load the weights (keys, shapes and architecture)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing DST')
    args = parser.parse_args(argv)
    check_output_file(parser, 'dst', args.dst, args.overwrite, [('src', args.src)])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    state_dict = convert(args.src, args.dst, args.prefix, args.check_config, args.overwrite)
    params = sum(v.numel() for k, v in state_dict.items()
                 if 'num_batches_tracked' not in k and k != EXTRA_STATE_KEY)
    record = '' if EXTRA_STATE_KEY in state_dict else \
        ' (no architecture record: loading checks keys and shapes only)'
    print(f'wrote {args.dst}: {_num_weights(state_dict)} tensors, {params / 1e6:.2f} M values'
          f'{record}')


if __name__ == '__main__':
    try:
        main()
    except (CheckpointReadError, BackboneCheckpointMismatchError, FileNotFoundError,
            FileExistsError, IsADirectoryError) as error:
        # A user mistake (unreadable input, weights of another backbone, a
        # missing --check-config): one line, as for argument errors.
        print(f'{osp.basename(sys.argv[0])}: error: {" ".join(str(error).split())}',
              file=sys.stderr)
        sys.exit(2)
