"""MMSegmentation segmentors whose losses include the SAR activation-rate loss."""
from mmseg.models.segmentors import EncoderDecoder

from sar_backbones.registry import MODELS
from .mixin import SARLossMixin


@MODELS.register_module()
class SAREncoderDecoder(SARLossMixin, EncoderDecoder):
    """:class:`mmseg.models.EncoderDecoder` with a SAR backbone.

    Identical to the parent (same arguments, same checkpoint keys) except that
    :meth:`loss` also returns the backbone's ``loss_act_rate`` and the logged
    ``act_rate*`` values. Set ``pretrained=None`` on the segmentor and load
    ImageNet weights through the backbone's ``init_cfg``.

    Example:
        >>> model = dict(type='sar_backbones.SAREncoderDecoder',
        ...              pretrained=None,
        ...              backbone=dict(type='sar_backbones.SARResNet',
        ...                            depth=50, base_stride=4, alpha=1),
        ...              ...)  # the rest as in mmseg's deeplabv3 config
    """
