from sar_backbones.inference.memory_format import memory_format_of
from .blocks import BasicBlock, Bottleneck, ResidualBlock, fold_conv_norm, make_shortcut
from .fusion import FusionGate
from .gumbel import straight_through_gumbel
from .masking import apply_group_mask, expand_mask, grid_for_feature, nearest_upsample
from .pooling import DepthwiseAvgPool2d
from .region_selection import RegionSelector, RegionSelectors, StackedRegionSelectors

__all__ = [
    'BasicBlock', 'Bottleneck', 'ResidualBlock', 'fold_conv_norm', 'make_shortcut', 'FusionGate',
    'apply_group_mask', 'expand_mask', 'grid_for_feature', 'memory_format_of',
    'nearest_upsample', 'DepthwiseAvgPool2d', 'RegionSelector', 'RegionSelectors',
    'StackedRegionSelectors', 'straight_through_gumbel'
]
