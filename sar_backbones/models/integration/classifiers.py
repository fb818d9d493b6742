"""MMPretrain classifier whose loss includes the SAR activation-rate loss."""
from mmpretrain.models.classifiers import ImageClassifier

from sar_backbones.registry import MODELS
from .mixin import SARLossMixin


@MODELS.register_module()
class SARImageClassifier(SARLossMixin, ImageClassifier):
    """:class:`mmpretrain.models.ImageClassifier` with a SAR backbone.

    Used for ImageNet pretraining. Identical to the parent (same arguments,
    same checkpoint keys, so ``tools/model_converters/sar2backbone.py`` can
    extract the ``backbone.`` weights) except that :meth:`loss` also returns
    the backbone's ``loss_act_rate`` and the logged ``act_rate*`` values.

    Example:
        >>> model = dict(type='sar_backbones.SARImageClassifier',
        ...              backbone=dict(type='sar_backbones.SARResNet',
        ...                            depth=50, out_indices=(3, )),
        ...              neck=dict(type='GlobalAveragePooling'),
        ...              head=dict(type='LinearClsHead', num_classes=1000,
        ...                        in_channels=2048))
    """
