"""Training-loop components (mmengine hooks) for SAR backbones."""
from .distributed_hooks import SARNoiseSeedHook, SARRateSyncHook
from .hooks import (SARGumbelNoiseHook, SARRateCalibrationHook, SARRateLoggerHook,
                    SARTargetRateHook, SARTemperatureHook, eval_margins, get_sar_backbone,
                    training_progress)
from .launch import setup_distributed_for_device, swap_sync_bn

__all__ = [
    'SARTemperatureHook', 'SARTargetRateHook', 'SARGumbelNoiseHook', 'SARRateLoggerHook',
    'SARRateCalibrationHook', 'eval_margins',
    'get_sar_backbone', 'training_progress', 'setup_distributed_for_device',
    'swap_sync_bn', 'SARNoiseSeedHook', 'SARRateSyncHook'
]
