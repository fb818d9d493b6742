"""Build SAR-ResNet backbones from preset names and task models from configs.

Shared by the analysis tools (``tools/analysis/*.py``): a preset such as
``sar-resnet50-g2s2a2b1`` (optionally ``-t0.5``, or ``sar-resnetv1c50-...``
for the deep stem) names a bare backbone in the paper's variant notation; a
config builds the whole task model through the registries of its default
scope (mmpretrain, mmdet or mmseg) and the backbone is ``model.backbone``.
"""
import copy
import re
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..engine.hooks import get_sar_backbone
from ..engine.launch import swap_sync_bn
from ..models.backbones import SARResNet

_PRESET = re.compile(
    r'^sar-resnet(?P<v1c>v1c)?(?P<depth>\d+)-g(?P<groups>\d+)s(?P<stride>\d+)'
    r'a(?P<alpha>\d+)b(?P<beta>\d+(?:\.\d+)?)(?:-t(?P<target>\d*\.?\d+))?$')

# Patch settings of the paper's model at 224x224 and their fixed-size
# counterpart for detection-size inputs (DESIGN.md section 1).
DEFAULT_PATCH_GRID = (14, 7, 2)
DEFAULT_PATCH_SIZE = (4, 4, 7)


def parse_preset(name: str) -> Dict[str, Any]:
    """Keyword arguments of :class:`SARResNet` for a preset name.

    Example:
        >>> parse_preset('sar-resnet50-g2s2a2b1-t0.5')
        {'depth': 50, 'mask_groups': 2, 'base_stride': 2, 'alpha': 2, 'beta': 1, 'target_rate': 0.5}
    """
    match = _PRESET.match(name.strip().lower())
    if match is None:
        raise ValueError(f'unknown preset {name!r}; expected sar-resnet<depth>-g<G>s<s>a<alpha>b<beta>'
                         '[-t<rate>], e.g. sar-resnet50-g2s2a2b1 or sar-resnetv1c50-g2s4a1b1-t0.5')
    beta = float(match['beta'])
    kwargs: Dict[str, Any] = dict(
        depth=int(match['depth']), mask_groups=int(match['groups']), base_stride=int(match['stride']),
        alpha=int(match['alpha']), beta=int(beta) if beta.is_integer() else beta)
    if match['v1c']:
        kwargs['deep_stem'] = True
    if match['target']:
        kwargs['target_rate'] = float(match['target'])
    return kwargs


def preset_name(depth: int, groups: int = 2, base_stride: int = 2, alpha: int = 2,
                beta: float = 1) -> str:
    """The preset name of a variant (inverse of :func:`parse_preset`)."""
    beta_text = str(int(beta)) if float(beta).is_integer() else str(beta)
    return f'sar-resnet{depth}-g{groups}s{base_stride}a{alpha}b{beta_text}'


def build_preset_backbone(name: str, patch_grid: Optional[Sequence[int]] = DEFAULT_PATCH_GRID,
                          patch_size: Optional[Sequence[int]] = None, **overrides) -> SARResNet:
    """A randomly initialised :class:`SARResNet` for a preset, in eval mode.

    Give ``patch_size`` (and ``patch_grid=None``) for detection-size inputs.
    """
    kwargs = parse_preset(name)
    if patch_size is not None:
        patch_grid = None
    kwargs.update(patch_grid=None if patch_grid is None else tuple(patch_grid),
                  patch_size=None if patch_size is None else tuple(patch_size))
    kwargs.update(overrides)
    return SARResNet(**kwargs).eval()


def load_config(path: str, cfg_options: Optional[dict] = None):
    """An mmengine ``Config`` with ``cfg_options`` merged and SyncBN swapped for BN."""
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    swap_sync_bn(cfg._cfg_dict)
    return cfg


def task_of_config(cfg) -> str:
    """'classifier', 'detector' or 'segmentor', from the config's default scope."""
    scope = cfg.get('default_scope', None)
    return {'mmpretrain': 'classifier', 'mmdet': 'detector', 'mmseg': 'segmentor'}.get(
        scope, 'unknown')


def build_model_from_config(cfg, checkpoint: Optional[str] = None) -> nn.Module:
    """The task model of a config (eval mode), optionally with trained weights.

    The backbone's ``Pretrained`` init is not run (the ImageNet file need not
    exist); ``checkpoint`` may be a whole-model checkpoint or a backbone-only one.
    """
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.get('backbone') is not None:
        model_cfg['backbone']['init_cfg'] = None
    if 'pretrained' in model_cfg:
        model_cfg['pretrained'] = None
    model = MODELS.build(model_cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()


def load_weights(model: nn.Module, checkpoint: str) -> Tuple[str, int]:
    """Load a whole-model or backbone-only checkpoint into ``model`` (strict where it applies).

    Returns which part was loaded ('model' or 'backbone') and the number of tensors.
    """
    from ..models.backbones.checkpoint import (BackboneCheckpointMismatchError, describe_mismatch,
                                               extract_state_dict, load_checkpoint_file)
    state = extract_state_dict(load_checkpoint_file(checkpoint), source=checkpoint)
    target, part = model, 'model'
    backbone = model if isinstance(model, SARResNet) else getattr(model, 'backbone', None)
    if any(k.startswith('backbone.') for k in state):
        if isinstance(model, SARResNet):
            state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
            part = 'backbone'
    elif backbone is not None and backbone is not model:
        target, part = backbone, 'backbone'
    problem = describe_mismatch(target, state)
    if problem:
        raise BackboneCheckpointMismatchError(
            f'checkpoint {checkpoint} does not match the {part}: {problem}')
    target.load_state_dict(state, strict=True)
    return part, len(state)


class LoadedModel(NamedTuple):
    """What an analysis tool works on: the config (None for a preset), task, model, backbone."""
    cfg: Any
    task: str
    model: nn.Module
    backbone: SARResNet


def load_model(config: Optional[str] = None, preset: Optional[str] = None,
               checkpoint: Optional[str] = None,
               patch_size: Optional[Sequence[int]] = None,
               cfg_options: Optional[dict] = None) -> LoadedModel:
    """A config's task model, or a preset's bare backbone (task ``'preset'``), in eval mode.

    Give exactly one of ``config`` and ``preset``; ``checkpoint`` loads trained
    weights (whole-model or backbone-only), ``patch_size`` switches a preset to
    fixed-size patches, ``cfg_options`` is merged into the config.
    """
    if (config is None) == (preset is None):
        raise ValueError('give exactly one of config and preset')
    if config is not None:
        cfg = load_config(config, cfg_options)
        model = build_model_from_config(cfg, checkpoint)
        return LoadedModel(cfg, task_of_config(cfg), model, get_sar_backbone(model))
    kwargs = {} if not patch_size else dict(patch_grid=None, patch_size=tuple(patch_size))
    backbone = build_preset_backbone(preset, **kwargs)
    if checkpoint:
        load_weights(backbone, checkpoint)
    return LoadedModel(None, 'preset', backbone, backbone)


def random_image(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A reproducible normalised-image-like input ``(1, C, H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, *shape, generator=generator)
