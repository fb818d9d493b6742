"""The models the analysis tools work on, built from preset names or configs.

Shared by ``tools/analysis/*.py``, ``tools/demo.py`` and the latency benchmark
(``benchmarks/latency.py``):

* a preset such as ``sar-resnet50-g2s2a2b1`` (optionally ``-t0.5``, or
  ``sar-resnetv1c50-...`` for the deep stem) names a bare backbone in the
  paper's variant notation (:func:`parse_preset`, :func:`build_preset_backbone`);
* a config builds the whole task model through the registries of its default
  scope (mmpretrain, mmdet or mmseg) and the backbone is ``model.backbone``
  (:func:`load_model`, :func:`build_model_from_config`); :func:`load_weights`
  loads a whole-model or backbone-only checkpoint into either;
* :func:`reference_resnet` builds the plain ResNet a SAR backbone replaces,
  the reference of every cost and latency comparison.
"""
import copy
import re
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch.nn as nn
import torchvision
from torch import Tensor

from sar_backbones.engine import get_sar_backbone, swap_sync_bn
from sar_backbones.models.backbones import SARBackboneMixin, SARResNet
from sar_backbones.models.backbones.checkpoint import (BackboneCheckpointMismatchError,
                                                       describe_mismatch, extract_state_dict,
                                                       load_checkpoint_file)

_PRESET = re.compile(
    r'^sar-resnet(?P<v1c>v1c)?(?P<depth>\d+)-g(?P<groups>\d+)s(?P<stride>\d+)'
    r'a(?P<alpha>\d+)b(?P<beta>\d+(?:\.\d+)?)(?:-t(?P<target>\d*\.?\d+))?$')

# Patch settings of the paper's model at 224x224 and their fixed-size
# counterpart for detection-size inputs (README.md, "Use SAR-ResNet in your own config").
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
        raise ValueError(f'unknown preset {name!r}; expected '
                         'sar-resnet<depth>-g<G>s<s>a<alpha>b<beta>'
                         '[-t<rate>], e.g. sar-resnet50-g2s2a2b1 or sar-resnetv1c50-g2s4a1b1-t0.5')
    beta = float(match['beta'])
    kwargs: Dict[str, Any] = dict(
        depth=int(match['depth']), mask_groups=int(match['groups']),
        base_stride=int(match['stride']), alpha=int(match['alpha']),
        beta=int(beta) if beta.is_integer() else beta)
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
    state = extract_state_dict(load_checkpoint_file(checkpoint), source=checkpoint)
    target, part = model, 'model'
    backbone = model if isinstance(model, SARBackboneMixin) else getattr(model, 'backbone', None)
    if any(k.startswith('backbone.') for k in state):
        if isinstance(model, SARBackboneMixin):
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


# ------------------------------------------------------------ reference ResNets
class TorchvisionBackbone(nn.Module):
    """A torchvision ResNet without its pooling and FC head: returns the 4 stage outputs.

    The same output contract as :class:`SARResNet` with ``out_indices=(0, 1, 2, 3)``,
    so that the two backbones are timed and counted on equal terms.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'):
            self.add_module(name, getattr(resnet, name))

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return tuple(outs)


TORCHVISION_RESNETS = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
                       50: torchvision.models.resnet50, 101: torchvision.models.resnet101}


def torchvision_resnet(depth: int, num_classes: Optional[int] = None) -> nn.Module:
    """torchvision ResNet-``depth`` (random weights, eval mode).

    Args:
        depth (int): 18, 34, 50 or 101.
        num_classes (int, optional): Keep the classification head with this
            many classes; None gives the backbone (:class:`TorchvisionBackbone`).
    """
    if depth not in TORCHVISION_RESNETS:
        raise ValueError(
            f'no torchvision ResNet-{depth}; choose from {sorted(TORCHVISION_RESNETS)}')
    if num_classes:
        return TORCHVISION_RESNETS[depth](num_classes=num_classes).eval()
    return TorchvisionBackbone(TORCHVISION_RESNETS[depth]()).eval()


def reference_resnet(model: nn.Module,
                     num_classes: Optional[int] = None) -> Tuple[Optional[nn.Module], str]:
    """The plain ResNet a SAR backbone replaces (random weights, eval mode), and its name.

    Same depth, stem (plain or deep), stem and stage widths, strides and
    dilations, so that both are counted at the same feature resolutions. The
    standard backbone (7x7 stem, widths 64, strides 4/8/16/32) is torchvision's
    ResNet, with its head when ``num_classes`` is given; a deep-stem, dilated
    (the mmseg OS8 setting) or re-sized one is mmseg's ``ResNetV1c``/``ResNet``.

    Args:
        model (nn.Module): A :class:`SARResNet` or a model holding one.
        num_classes (int, optional): Classes of the head (standard backbones only).

    Returns:
        tuple: The ResNet and its name, or ``(None, '')`` for a standard
        backbone whose depth torchvision does not have.
    """
    sar = get_sar_backbone(model)
    stem = sar.stem[-3].out_channels if sar.deep_stem else sar.conv1.out_channels
    block, _ = sar.arch_settings[sar.depth]
    base = sar.stage_channels[0] // block.expansion
    strides, dilations = tuple(sar.strides), tuple(sar.dilations)
    standard = (not sar.deep_stem and strides == (1, 2, 2, 2) and dilations == (1, 1, 1, 1)
                and (sar.in_channels, stem, base) == (3, 64, 64))
    if standard:
        if sar.depth not in TORCHVISION_RESNETS:
            return None, ''
        part = 'with head' if num_classes else 'backbone'
        return torchvision_resnet(sar.depth, num_classes), f'torchvision resnet{sar.depth} ({part})'
    # mmseg's ResNet is the one whose BasicBlock accepts dilation (the OS8
    # segmentation setting); torchvision's refuses it.
    from mmseg.models.backbones import ResNet, ResNetV1c
    cls = ResNetV1c if sar.deep_stem else ResNet
    resnet = cls(depth=sar.depth, in_channels=sar.in_channels, stem_channels=stem,
                 base_channels=base, strides=strides, dilations=dilations,
                 contract_dilation=any(d > 1 for d in dilations))
    resnet.eval()  # (mmseg's ResNet.train() does not return the module)
    return resnet, (f'mmseg {cls.__name__}-{sar.depth} (strides {strides}, '
                    f'dilations {dilations}; backbone)')
