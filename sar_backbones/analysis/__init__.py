from .complexity import count_macs, find_sar_backbone, model_complexity

__all__ = ['count_macs', 'find_sar_backbone', 'model_complexity']
