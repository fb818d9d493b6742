from .sar_resnet import SARResNet
from .sar_stage import SARStage

__all__ = ['SARResNet', 'SARStage']
