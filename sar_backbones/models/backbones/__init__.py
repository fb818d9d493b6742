from .sar_api import ForwardRecord, SARBackboneMixin
from .sar_mobilenet_v2 import SARMobileNetV2
from .sar_resnet import SARResNet
from .sar_resnext import SARResNeXt
from .sar_stage import SARStage

__all__ = [
    'ForwardRecord', 'SARBackboneMixin', 'SARMobileNetV2', 'SARResNet', 'SARResNeXt', 'SARStage'
]
