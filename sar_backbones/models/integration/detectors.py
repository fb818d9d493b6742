"""MMDetection detectors whose losses include the SAR activation-rate loss."""
from mmdet.models.detectors import FasterRCNN, RetinaNet

from sar_backbones.registry import MODELS
from .mixin import SARLossMixin


@MODELS.register_module()
class SARFasterRCNN(SARLossMixin, FasterRCNN):
    """Faster R-CNN (:class:`mmdet.models.FasterRCNN`) with a SAR backbone.

    Identical to the parent (same arguments, same checkpoint keys) except that
    :meth:`loss` also returns the backbone's ``loss_act_rate`` and the logged
    ``act_rate*`` values.

    Example:
        >>> model = dict(type='sar_backbones.SARFasterRCNN',
        ...              backbone=dict(type='sar_backbones.SARResNet',
        ...                            depth=50),
        ...              ...)  # the rest as in mmdet's faster-rcnn config
    """


@MODELS.register_module()
class SARRetinaNet(SARLossMixin, RetinaNet):
    """RetinaNet (:class:`mmdet.models.RetinaNet`) with a SAR backbone.

    Identical to the parent except that :meth:`loss` also returns the
    backbone's ``loss_act_rate`` and the logged ``act_rate*`` values.

    Example:
        >>> model = dict(type='sar_backbones.SARRetinaNet',
        ...              backbone=dict(type='sar_backbones.SARResNet',
        ...                            depth=50),
        ...              ...)  # the rest as in mmdet's retinanet config
    """
