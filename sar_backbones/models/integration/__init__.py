"""Task models (mmdet, mmseg, mmpretrain) that train SAR backbones."""
from .checkpoint import (BackboneCheckpointMismatchError,
                         check_backbone_state_dict, describe_backbone)
from .classifiers import SARImageClassifier
from .detectors import SARFasterRCNN, SARRetinaNet
from .mixin import SARLossMixin
from .segmentors import SAREncoderDecoder

__all__ = [
    'SARLossMixin', 'SARFasterRCNN', 'SARRetinaNet', 'SAREncoderDecoder',
    'SARImageClassifier', 'BackboneCheckpointMismatchError',
    'check_backbone_state_dict', 'describe_backbone'
]
