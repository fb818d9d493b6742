from .complexity import count_macs, model_complexity
from .flops_stats import (dataloader_inputs, folder_inputs, measure_rates,
                          plot_rate_flops_histogram, rate_statistics)
from .mask_vis import collect_masks, overlay, save_overlays, stage_group_weights

__all__ = [
    'count_macs', 'model_complexity', 'dataloader_inputs', 'folder_inputs', 'measure_rates',
    'rate_statistics', 'plot_rate_flops_histogram', 'collect_masks', 'overlay', 'save_overlays',
    'stage_group_weights'
]
