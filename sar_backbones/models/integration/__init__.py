"""Task models (mmdet, mmseg, mmpretrain) that train SAR backbones.

The wrappers are loaded on first use (attribute access here, or a config
building ``sar_backbones.SAR*`` through the registry, see
:mod:`.task_models`), so that importing the package does not import the task
libraries.
"""
import importlib

from .checkpoint import (BackboneCheckpointMismatchError, CheckpointReadError,
                         UnsafeCheckpointError, check_backbone_state_dict, describe_backbone,
                         load_checkpoint_file)
from .mixin import SARLossMixin

# Wrapper class -> module defining it (its task library is imported with it).
_LAZY = {
    'SARFasterRCNN': 'detectors',
    'SARRetinaNet': 'detectors',
    'SAREncoderDecoder': 'segmentors',
    'SARImageClassifier': 'classifiers',
}

__all__ = [
    'SARLossMixin', 'SARFasterRCNN', 'SARRetinaNet', 'SAREncoderDecoder',
    'SARImageClassifier', 'BackboneCheckpointMismatchError', 'CheckpointReadError',
    'UnsafeCheckpointError', 'check_backbone_state_dict', 'describe_backbone',
    'load_checkpoint_file'
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
