from .benchmark import LatencyConfig, format_report, run_latency_benchmark, save_report
from .complexity import count_macs, model_complexity
from .flops_stats import (dataloader_inputs, folder_inputs, measure_rates,
                          plot_rate_flops_histogram, rate_statistics)
from .latency import (PartTimer, TorchvisionBackbone, build_resnet_backbone, fold_batchnorm,
                      interleaved_timing, summarize)
from .mask_vis import collect_masks, overlay, save_overlays, stage_group_weights
from .presets import build_model_from_config, build_preset_backbone, load_weights, parse_preset

__all__ = [
    'count_macs', 'model_complexity', 'LatencyConfig',
    'run_latency_benchmark', 'format_report', 'save_report', 'dataloader_inputs', 'folder_inputs',
    'measure_rates', 'rate_statistics', 'plot_rate_flops_histogram', 'PartTimer',
    'TorchvisionBackbone', 'build_resnet_backbone', 'fold_batchnorm', 'interleaved_timing',
    'summarize', 'collect_masks', 'overlay', 'save_overlays', 'stage_group_weights',
    'build_model_from_config', 'build_preset_backbone', 'load_weights', 'parse_preset'
]
