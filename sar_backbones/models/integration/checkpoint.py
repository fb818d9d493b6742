"""Check that backbone weights fit a SAR-ResNet before they are used.

mmengine's ``Pretrained`` initialiser loads with ``strict=False`` and only
*logs* missing, unexpected or mis-shaped keys, so a detector built with a
different depth or group number than the pretraining run would silently keep
random weights in part of its backbone. ``SARResNet.init_weights`` therefore
loads ``init_cfg=dict(type='Pretrained', ...)`` strictly
(:func:`sar_backbones.models.backbones.checkpoint.load_pretrained`); this
module exposes the same comparison as a check that tools (the checkpoint
converter's ``--check-config``) and tests run on a state dict in memory.
"""
from typing import Mapping, Optional

import torch
from torch import nn

from ..backbones.checkpoint import describe_mismatch

# Architecture attributes of ``SARResNet`` worth naming in an error message.
_ARCH_ATTRS = ('depth', 'groups', 'base_strides', 'alpha', 'beta', 'deep_stem')


class BackboneCheckpointMismatchError(ValueError):
    """A backbone checkpoint does not fit the backbone it is loaded into."""


def describe_backbone(backbone: nn.Module) -> str:
    """A one-line summary of a backbone's architecture, e.g. for messages.

    Args:
        backbone (nn.Module): Usually a ``SARResNet``.

    Returns:
        str: e.g. ``SARResNet(depth=50, groups=2, base_strides=(2, 2, 2),
        alpha=2, beta=1, deep_stem=False)``.
    """
    parts = [f'{name}={getattr(backbone, name)!r}' for name in _ARCH_ATTRS
             if hasattr(backbone, name)]
    return f'{type(backbone).__name__}({", ".join(parts)})'


def check_backbone_state_dict(backbone: nn.Module,
                              state_dict: Mapping[str, torch.Tensor],
                              source: Optional[str] = None) -> None:
    """Check that ``state_dict`` provides exactly the backbone's weights.

    Every key of ``backbone.state_dict()`` must be present with the same
    shape, and there must be no extra key (extra keys mean the weights belong
    to another architecture, e.g. a deeper network).

    Args:
        backbone (nn.Module): The backbone that will receive the weights.
        state_dict (Mapping[str, Tensor]): Backbone weights with keys relative
            to the backbone (no ``backbone.`` prefix), as written by
            ``tools/model_converters/sar2backbone.py``.
        source (str, optional): Where the weights come from, for the message.
            Defaults to None.

    Raises:
        BackboneCheckpointMismatchError: If keys are missing or unexpected or
            shapes differ. The message names the backbone's architecture and
            lists the offending keys and shapes.

    Example:
        >>> from sar_backbones.models import SARResNet
        >>> r18 = SARResNet(depth=18)
        >>> check_backbone_state_dict(r18, r18.state_dict())  # passes
        >>> check_backbone_state_dict(SARResNet(depth=34), r18.state_dict())
        Traceback (most recent call last):
        ...
        BackboneCheckpointMismatchError: The weights do not match ...
    """
    problem = describe_mismatch(backbone, dict(state_dict))
    if not problem:
        return
    origin = f' from {source}' if source else ''
    raise BackboneCheckpointMismatchError(
        f'The weights{origin} do not match the backbone '
        f'{describe_backbone(backbone)}: {problem}. They were most likely '
        f'produced by a network with another depth, group number G, base '
        f'stride, alpha/beta or stem; convert the pretraining run whose '
        f'backbone matches this config.')
