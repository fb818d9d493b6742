"""The SAR module that replaces one ResNet stage (paper Fig. 2)."""
from typing import Callable, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import Tensor

from sar_backbones.inference.ops import run_refine_stage
from ..layers import (DepthwiseAvgPool2d, FusionGate, RegionSelector, RegionSelectors,
                      ResidualBlock, expand_mask, grid_for_feature)
from ..layers.blocks import DEPLOYED_TRAIN_ERROR, folded_conv

MaskOverride = Callable[[Tensor, int], Tensor]


def sparse_refine_forward(blocks: Sequence[ResidualBlock], x: Tensor,
                          masks: Sequence[Tensor]) -> Tensor:
    """Run a stage's refine blocks on their selected patches only (the inference engine).

    Deployed blocks hand over their own folded weights; others fold (and
    cache) theirs on the fly. Returns ``(B, C, H, W)`` in channels-last memory.
    """
    first = blocks[0]
    if any(block.dilation != first.dilation or block.groups != first.groups for block in blocks):
        raise ValueError('the refine blocks of a stage must share their dilation and groups')
    weights, biases, shortcuts = [], [], []
    for block in blocks:
        convs, shortcut = block.sparse_weights()
        for weight, bias in convs:
            weights.append(weight)
            biases.append(bias)
        if shortcut is not None:
            weights.append(shortcut[0])
            biases.append(shortcut[1])
        shortcuts.append(int(shortcut is not None))
    return run_refine_stage(x, torch.stack(list(masks)), weights, biases, len(first.specs),
                            shortcuts, [int(block.last_relu) for block in blocks],
                            first.dilation)


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
        dcn (dict, optional): Deformable 3x3 conv config of the stage's plain
            blocks (entry, base branch, exit); the refine blocks keep plain
            convolutions so that the sparse path stays exact (see
            :data:`~sar_backbones.models.layers.blocks.REFINE_EXTRAS_ERROR`).
        plugins (Sequence[dict], optional): Plugin layers of the stage's plain
            blocks (``dict(cfg=..., position=...)``), not of the refine blocks.
        drop_path_rates (Sequence[float], optional): Stochastic depth rate of
            each depth position, in order: the entry block (if any), the
            ``n-1`` base/refine pairs (a base block and the refine block beside
            it share a rate) and the exit block (if any). Defaults to no drop.
    """

    def __init__(self, block: Type[ResidualBlock], in_channels: int, out_channels: int,
                 num_blocks: int, groups: int, base_stride: int, alpha: int, beta: float,
                 patch_grid: Optional[int] = None, patch_size: Optional[int] = None,
                 dilation: int = 1, entry_stride: Optional[int] = None, entry_dilation: int = 1,
                 exit_block: bool = False, conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'), dcn: Optional[dict] = None,
                 plugins: Optional[Sequence[dict]] = None,
                 drop_path_rates: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.patch_grid = patch_grid
        self.patch_size = patch_size
        self.groups = groups
        base_width = out_channels // alpha
        refine_width = int(out_channels * beta)
        depth = num_blocks - 1
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)
        # Options go to a block only when set, so that block types without
        # them (e.g. SAR-ResNeXt's) build as before.
        plain = dict(common)
        if dcn is not None:
            plain['dcn'] = dcn
        if plugins:
            plain['plugins'] = plugins
        positions = int(entry_stride is not None) + depth + int(exit_block)
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.0] * positions
        if len(rates) != positions:
            raise ValueError(f'drop_path_rates needs {positions} rates (entry, {depth} base/'
                             f'refine pairs, exit), got {len(rates)}')

        def drop(rate: float) -> dict:
            return dict(drop_path_rate=rate) if rate > 0 else {}

        entry_rate = rates.pop(0) if entry_stride is not None else 0.0
        exit_rate = rates.pop() if exit_block else 0.0
        self.entry = None if entry_stride is None else block(
            in_channels, in_channels, stride=entry_stride, dilation=entry_dilation, **plain,
            **drop(entry_rate))
        self.base_pool = DepthwiseAvgPool2d(3, stride=2, padding=1) if base_stride == 4 else None
        # Without an alignment conv after it, the last block of a branch feeds
        # the fusion directly, which applies the ReLU after the sum.
        self.base_blocks = nn.ModuleList(
            block(in_channels if i == 0 else base_width, base_width, stride=2 if i == 0 else 1,
                  last_relu=alpha != 1 or i < depth - 1, **plain, **drop(rates[i]))
            for i in range(depth))
        self.selectors = RegionSelectors(
            RegionSelector(base_width, groups, norm_cfg) for _ in range(depth))
        # No dcn / plugins here: the sparse path must reproduce these blocks exactly.
        self.refine_blocks = nn.ModuleList(
            block(in_channels if i == 0 else refine_width, refine_width, dilation=dilation,
                  groups=groups, last_relu=beta != 1 or i < depth - 1, **common,
                  **drop(rates[i]))
            for i in range(depth))
        self.base_align = _align(base_width, out_channels, conv_cfg, norm_cfg)
        self.refine_align = _align(refine_width, out_channels, conv_cfg, norm_cfg)
        self.fusion_gate = FusionGate(out_channels)
        self.exit = block(out_channels, out_channels, dilation=dilation, **plain,
                          **drop(exit_rate)) if exit_block else None
        self._deployed = False

    def set_name(self, name: str) -> None:
        """Where the stage sits in the model (e.g. ``'layer2'``), for error messages."""
        self.selectors.name = f'{name}.selectors'

    @property
    def deployed(self) -> bool:
        return self._deployed

    def train(self, mode: bool = True) -> 'SARStage':
        if mode and self._deployed:
            raise RuntimeError(DEPLOYED_TRAIN_ERROR)
        return super().train(mode)

    def switch_to_deploy(self) -> None:
        """Fold BatchNorm everywhere and stack the selectors, once (mmpretrain RepVGG style).

        Every block (entry, base, refine, exit) folds its norms into its
        convolutions, the alignments fold theirs, and the region selectors
        become one :class:`StackedRegionSelectors`. Afterwards the stage's
        weights are the prepared state of the sparse path: a forward walks no
        parameters and consults no cache. Inference only.
        """
        if self.training:
            raise RuntimeError('switch_to_deploy() needs an eval model: call .eval() first')
        if self._deployed:
            return
        blocks = [self.entry, self.exit, *self.base_blocks, *self.refine_blocks]
        for block in blocks:
            if block is not None:
                block.switch_to_deploy()
        for name in ('base_align', 'refine_align'):
            align = getattr(self, name)
            if align is not None:
                align[0] = folded_conv(align[0], align[1], f'{name}.0')
                align[1] = nn.Identity()
        if isinstance(self.selectors, RegionSelectors):
            self.selectors = self.selectors.switch_to_deploy()
        self._deployed = True

    @property
    def num_masked_blocks(self) -> int:
        return len(self.refine_blocks)

    def patch_grid_for(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid ``(Kh, Kw)`` at a refine-branch feature size, checking it fits."""
        return grid_for_feature(height, width, self.patch_grid, self.patch_size)

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
        # The sparse path's refine output is a scratch buffer nobody else holds
        # (under torch.compile the compiler plans the memory itself).
        in_place = sparse and self.refine_align is None and not torch.compiler.is_compiling()
        out = self.fusion_gate(x_base, x_refine, in_place=in_place)
        if self.exit is not None:
            out = self.exit(out)
        return out, masks
