from .sar_resnet import SARResNet
from .sar_resnext import SARResNeXt
from .sar_stage import SARStage

__all__ = ['SARResNet', 'SARResNeXt', 'SARStage']
