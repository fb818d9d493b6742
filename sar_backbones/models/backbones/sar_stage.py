"""The SAR module that replaces one ResNet stage (paper Fig. 2)."""
from typing import Callable, List, Optional, Tuple, Type

import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import Tensor

from ..layers import (DepthwiseAvgPool2d, FusionGate, RegionSelector, RegionSelectors,
                      ResidualBlock, expand_mask, grid_for_feature, sparse_refine_forward)

MaskOverride = Callable[[Tensor, int], Tensor]


def _align(in_channels: int, out_channels: int, conv_cfg: Optional[dict],
           norm_cfg: dict) -> Optional[nn.Sequential]:
    """1x1 conv + norm mapping a branch to the stage width (None when already equal)."""
    if in_channels == out_channels:
        return None
    return nn.Sequential(
        build_conv_layer(conv_cfg, in_channels, out_channels, 1, bias=False),
        build_norm_layer(norm_cfg, out_channels)[1])


class SARStage(nn.Module):
    """Base branch, region selection, refine branch and adaptive fusion of one stage.

    For a ResNet stage of ``n`` blocks and width ``C``:

    * ``entry`` (optional): the stage's downsampling block. In the authors'
      model it closes the previous SAR module; it is owned here so that each
      stage output keeps the standard ResNet stride for dense prediction.
    * base branch: ``n-1`` blocks at ``1/s`` resolution and width ``C/alpha``
      (the first has stride 2; ``s=4`` pools once more before it);
    * ``n-1`` region selectors, each fed by the matching base block;
    * refine branch: ``n-1`` blocks at full resolution and width ``beta*C``,
      convolutions grouped by ``G``, each block masked by its selector;
    * 1x1 alignments to ``C``, the fusion gate, and ``exit`` (optional): one
      more full-resolution block (the last SAR module's stride-1 block).

    Args:
        block (type): :class:`BasicBlock` or :class:`Bottleneck`.
        in_channels (int): Input channels.
        out_channels (int): Stage width ``C``.
        num_blocks (int): Blocks ``n`` of the ResNet stage being replaced (>= 2).
        groups (int): Channel groups ``G`` of the refine branch.
        base_stride (int): Resolution reduction ``s`` of the base branch (2 or 4).
        alpha (int): Width reduction of the base branch.
        beta (float): Width factor of the refine branch.
        patch_grid (int, optional): ``K``: a ``K x K`` patch grid at any input size.
        patch_size (int, optional): Fixed patch size in pixels instead of ``patch_grid``.
        dilation (int): Dilation of the full-resolution 3x3 convolutions.
        entry_stride (int, optional): Stride of the entry block; None for no entry block.
        entry_dilation (int): Dilation of the entry block.
        exit_block (bool): Whether to end with a stride-1 block.
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config.
    """

    def __init__(self, block: Type[ResidualBlock], in_channels: int, out_channels: int,
                 num_blocks: int, groups: int, base_stride: int, alpha: int, beta: float,
                 patch_grid: Optional[int] = None, patch_size: Optional[int] = None,
                 dilation: int = 1, entry_stride: Optional[int] = None, entry_dilation: int = 1,
                 exit_block: bool = False, conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN')) -> None:
        super().__init__()
        self.patch_grid = patch_grid
        self.patch_size = patch_size
        self.groups = groups
        base_width = out_channels // alpha
        refine_width = int(out_channels * beta)
        depth = num_blocks - 1
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)

        self.entry = None if entry_stride is None else block(
            in_channels, in_channels, stride=entry_stride, dilation=entry_dilation, **common)
        self.base_pool = DepthwiseAvgPool2d(3, stride=2, padding=1) if base_stride == 4 else None
        # Without an alignment conv after it, the last block of a branch feeds
        # the fusion directly, which applies the ReLU after the sum.
        self.base_blocks = nn.ModuleList(
            block(in_channels if i == 0 else base_width, base_width, stride=2 if i == 0 else 1,
                  last_relu=alpha != 1 or i < depth - 1, **common) for i in range(depth))
        self.selectors = RegionSelectors(
            RegionSelector(base_width, groups, norm_cfg) for _ in range(depth))
        self.refine_blocks = nn.ModuleList(
            block(in_channels if i == 0 else refine_width, refine_width, dilation=dilation,
                  groups=groups, last_relu=beta != 1 or i < depth - 1, **common)
            for i in range(depth))
        self.base_align = _align(base_width, out_channels, conv_cfg, norm_cfg)
        self.refine_align = _align(refine_width, out_channels, conv_cfg, norm_cfg)
        self.fusion_gate = FusionGate(out_channels)
        self.exit = block(out_channels, out_channels, dilation=dilation, **common) \
            if exit_block else None

    @property
    def num_masked_blocks(self) -> int:
        return len(self.refine_blocks)

    def patch_grid_for(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid ``(Kh, Kw)`` at a refine-branch feature size, checking it fits."""
        grid = grid_for_feature(height, width, self.patch_grid, self.patch_size)
        if grid[0] > height or grid[1] > width:
            raise ValueError(
                f'input too small: a {height}x{width} feature map cannot be split into the '
                f'{grid[0]}x{grid[1]} patch grid (patch_grid={self.patch_grid}); feed a larger '
                'image or use patch_size=... for a grid that follows the input size')
        return grid

    def forward(self, x: Tensor, tau: float, sparse: bool = False,
                mask_override: Optional[MaskOverride] = None) -> Tuple[Tensor, List[Tensor]]:
        """Returns the fused stage output and the ``n-1`` patch masks ``(B, G, Kh, Kw)``."""
        if self.entry is not None:
            x = self.entry(x)
        size = x.shape[-2:]
        grid = self.patch_grid_for(*size)

        x_base = x if self.base_pool is None else self.base_pool(x)
        base_features = []
        for base_block in self.base_blocks:
            x_base = base_block(x_base)
            base_features.append(x_base)
        masks = self.selectors(base_features, grid, tau)
        if mask_override is not None:
            masks = [mask_override(mask, index) for index, mask in enumerate(masks)]

        if sparse:
            x_refine = sparse_refine_forward(self.refine_blocks, x, masks)
        else:
            x_refine = x
            for refine_block, mask in zip(self.refine_blocks, masks):
                x_refine = refine_block(x_refine, expand_mask(mask, size))

        if self.base_align is not None:
            x_base = self.base_align(x_base)
        if self.refine_align is not None:
            x_refine = self.refine_align(x_refine)
        # The sparse path's refine output is a scratch buffer nobody else holds.
        out = self.fusion_gate(x_base, x_refine, in_place=sparse and self.refine_align is None)
        if self.exit is not None:
            out = self.exit(out)
        return out, masks
