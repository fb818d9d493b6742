"""The SAR module that replaces one MobileNetV2 layer (paper Fig. 2 with inverted residuals)."""
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import Tensor

from sar_backbones.inference.memory_format import memory_format_of
from sar_backbones.inference.sparse_inverted_residual import (sparse_inverted_residual_stage,
                                                              stage_weights)
from .blocks import folded_conv
from .fusion import FusionGate
from .inverted_residual import InvertedResidual
from .masking import expand_mask, grid_for_feature, nearest_upsample
from .pooling import DepthwiseAvgPool2d
from .region_selection import RegionSelector, RegionSelectors

MaskOverride = Callable[[Tensor, int], Tensor]


class LinearFusionGate(FusionGate):
    """``y = a * up(x_base) + (1 - a) * x_refine`` with no activation (linear bottleneck).

    :class:`FusionGate`'s channel weights ``a`` (Eq. 5); MobileNetV2's layer
    outputs are linear, so unlike SAR-ResNet's fusion no ReLU follows the sum
    (as in the authors' SAR-MobileNetV2).
    """

    def forward(self, x_base: Tensor, x_refine: Tensor, in_place: bool = False) -> Tensor:
        weight = self.weights(x_base)
        low = nearest_upsample(x_base * weight, x_refine.shape[-2:])
        return torch.addcmul(low, x_refine, 1 - weight).contiguous(
            memory_format=memory_format_of(x_base))


def _align(in_channels: int, out_channels: int, conv_cfg: Optional[dict],
           norm_cfg: dict) -> Optional[nn.Sequential]:
    """Linear 1x1 conv + norm mapping a branch to the layer width (None when equal)."""
    if in_channels == out_channels:
        return None
    return nn.Sequential(build_conv_layer(conv_cfg, in_channels, out_channels, 1, bias=False),
                         build_norm_layer(norm_cfg, out_channels)[1])


class SARInvertedResidualStage(nn.Module):
    """Entry, base branch, region selection, refine branch and fusion of a MobileNetV2 layer.

    For a MobileNetV2 layer of ``n`` inverted residual blocks, expansion
    ``t`` and width ``C``:

    * ``entry``: the layer's first block (its stride, dilation and width
      change), dense;
    * base branch: 3x3/2 average pooling (twice for ``s=4``), then ``n-1``
      stride-1 blocks at ``1/s`` resolution and width ``C/alpha``;
    * ``n-1`` region selectors, one per refine block, each fed by the
      matching base block;
    * refine branch: ``n-1`` blocks at full resolution and width ``beta*C``,
      1x1 convs grouped by ``G`` (the depthwise conv is grouped anyway),
      each masked by its selector;
    * linear 1x1 alignments to ``C`` (when ``alpha``/``beta`` != 1) and the
      linear fusion gate (:class:`LinearFusionGate`).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Layer width ``C``.
        num_blocks (int): Blocks ``n`` of the MobileNetV2 layer (>= 2).
        expand_ratio (float): Expansion ``t`` of the blocks.
        stride (int): Stride of the entry block.
        dilation (int): Dilation of the entry block's depthwise conv.
        groups (int): Mask groups ``G``.
        base_stride (int): ``s``, 2 or 4.
        alpha (int): Base width ``C/alpha``.
        beta (float): Refine width ``beta*C``.
        patch_grid (int, optional): ``K``: a ``K x K`` patch grid at any input size.
        patch_size (int, optional): Fixed patch size in pixels instead.
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config.
        act_cfg (dict): Activation of the blocks (ReLU6).
        with_cp (bool): Gradient checkpointing of the entry block.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int,
                 expand_ratio: float, stride: int, dilation: int, groups: int,
                 base_stride: int, alpha: int, beta: float, patch_grid: Optional[int] = None,
                 patch_size: Optional[int] = None, conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'), act_cfg: dict = dict(type='ReLU6'),
                 with_cp: bool = False) -> None:
        super().__init__()
        if num_blocks < 2:
            raise ValueError(f'a SAR layer needs >= 2 blocks (an entry and a refined one), got '
                             f'{num_blocks}')
        self.patch_grid = patch_grid
        self.patch_size = patch_size
        self.groups = groups
        base_width = out_channels // alpha
        refine_width = int(out_channels * beta)
        depth = num_blocks - 1
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.entry = InvertedResidual(in_channels, out_channels, stride, expand_ratio,
                                      dilation=dilation, with_cp=with_cp, **common)
        # Pool first, then stride-1 blocks: the first base block's expansion
        # 1x1 runs at 1/s resolution, not at full (as in the authors' model,
        # whose base branch average-pools before its first block).
        self.base_pool = nn.Sequential(*(DepthwiseAvgPool2d(3, stride=2, padding=1)
                                         for _ in range(base_stride // 2)))
        self.base_blocks = nn.ModuleList(
            InvertedResidual(out_channels if i == 0 else base_width, base_width, 1,
                             expand_ratio, **common)
            for i in range(depth))
        self.selectors = RegionSelectors(
            RegionSelector(base_width, groups, norm_cfg) for _ in range(depth))
        self.refine_blocks = nn.ModuleList(
            InvertedResidual(out_channels if i == 0 else refine_width, refine_width, 1,
                             expand_ratio, groups=groups, **common)
            for i in range(depth))
        self.base_align = _align(base_width, out_channels, conv_cfg, norm_cfg)
        self.refine_align = _align(refine_width, out_channels, conv_cfg, norm_cfg)
        self.fusion_gate = LinearFusionGate(out_channels)

    def switch_to_deploy(self) -> None:
        """Fold BatchNorm everywhere and stack the selectors, once (inference only)."""
        if self.training:
            raise RuntimeError('switch_to_deploy() needs an eval model: call .eval() first')
        for block in (self.entry, *self.base_blocks, *self.refine_blocks):
            block.switch_to_deploy()
        for name in ('base_align', 'refine_align'):
            align = getattr(self, name)
            if align is not None and not isinstance(align[1], nn.Identity):
                align[0] = folded_conv(align[0], align[1], f'{name}.0')
                align[1] = nn.Identity()
        if isinstance(self.selectors, RegionSelectors):
            self.selectors = self.selectors.switch_to_deploy()

    def set_name(self, name: str) -> None:
        """Where the stage sits in the model (e.g. ``'layer2'``), for error messages."""
        self.selectors.name = f'{name}.selectors'

    @property
    def num_masked_blocks(self) -> int:
        return len(self.refine_blocks)

    def patch_grid_for(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid ``(Kh, Kw)`` at a refine-branch feature size, checking it fits."""
        return grid_for_feature(height, width, self.patch_grid, self.patch_size)

    def forward(self, x: Tensor, tau: float, sparse: bool = False,
                mask_override: Optional[MaskOverride] = None) -> Tuple[Tensor, List[Tensor]]:
        """The fused layer output and the ``n-1`` patch masks ``(B, G, Kh, Kw)``."""
        x = self.entry(x)
        size = x.shape[-2:]
        grid = self.patch_grid_for(*size)
        x_base = self.base_pool(x)
        base_features = []
        for block in self.base_blocks:
            x_base = block(x_base)
            base_features.append(x_base)
        masks = self.selectors(base_features, grid, tau)
        if mask_override is not None:
            masks = [mask_override(mask, index) for index, mask in enumerate(masks)]
        if sparse:
            weights, residuals = stage_weights(self.refine_blocks)
            x_refine = sparse_inverted_residual_stage(
                x, torch.stack(list(masks)), weights, residuals, dilation=1,
                clamp=self.refine_blocks[0].clamp)
        else:
            x_refine = x
            for block, mask in zip(self.refine_blocks, masks):
                x_refine = block(x_refine, expand_mask(mask, size))
        if self.base_align is not None:
            x_base = self.base_align(x_base)
        if self.refine_align is not None:
            x_refine = self.refine_align(x_refine)
        return self.fusion_gate(x_base, x_refine), masks
