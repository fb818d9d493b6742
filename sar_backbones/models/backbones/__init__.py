from .sar_mobilenet_v2 import SARMobileNetV2
from .sar_resnet import SARResNet
from .sar_resnext import SARResNeXt
from .sar_stage import SARStage

__all__ = ['SARMobileNetV2', 'SARResNet', 'SARResNeXt', 'SARStage']
