"""Sparse inference of SAR-MobileNetV2's refine branch (inverted residual blocks).

The same gather-convolve-scatter scheme as :mod:`.sparse` (whose patch
layout, patch selection, flat buffers and row products it uses), for
MobileNetV2's block ``x + project(dw3x3(expand(x)))``:

* the expansion and projection 1x1 convolutions (grouped by ``G``) run as
  (grouped) matrix products on the pixel rows of the selected patches;
* the depthwise 3x3 runs on the gathered ``(PH+2d) x (PW+2d)`` windows of the
  compact hidden buffer, in which pixels of unselected patches (and outside
  the map) read a zero row: the masking of the dense path, exactly;
* hidden activations are ReLU6 (``clamp(0, 6)``) or ReLU; the projection is
  linear (no activation after the block);
* the residual exists only where the block has one (stride 1 and
  ``in == out``); without it an unselected pixel outputs the last norm's
  shift alone.

BatchNorm is folded into the convolutions by the blocks
(:meth:`~sar_backbones.models.layers.inverted_residual.InvertedResidual.sparse_weights`).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sparse import (BlockPatches, PatchLayout, _cast, _group_rows, patch_layout, residual_function,
                     select_patches, to_flat)

ConvWeights = Sequence[Tuple[Tensor, Tensor]]


def sparse_inverted_residual_forward(convs: ConvWeights, residual: bool, x_flat: Tensor,
                                     patches: BlockPatches, layout: PatchLayout, groups: int,
                                     dilation: int, clamp: Optional[float] = 6.0) -> Tensor:
    """One masked inverted residual block on a flat ``(B*H*W + 2, C)`` buffer.

    Args:
        convs: BatchNorm-folded ``(weight, bias)`` of the expansion (if any),
            depthwise and projection convolutions.
        residual (bool): Whether the block adds its input (stride 1, ``in == out``).
        x_flat (Tensor): The block input as flat rows (:func:`~.sparse.to_flat`).
        patches (BlockPatches): The block's selected patches.
        layout (PatchLayout): The stage's patch layout.
        groups (int): Mask groups ``G``.
        dilation (int): Dilation ``d`` of the depthwise conv.
        clamp (float, optional): 6 for ReLU6, None for ReLU.

    Returns:
        Tensor: The block output in the same flat layout. With a residual the
        input buffer is updated in place (after every group has read it).
    """
    num_rows = x_flat.shape[0] - 2
    last_bias = _cast(convs[-1][1], x_flat.dtype)
    if residual:
        out = x_flat
    else:
        out = x_flat.new_zeros(num_rows + 2, convs[-1][0].shape[0])
    if patches.slots:
        out_rows = _group_rows(out, groups)
        base = out_rows.index_select(0, patches.write_core).view(-1, out.shape[1])
        updated = residual_function(convs, x_flat, patches, layout, groups, dilation, base,
                                    clamp=clamp)
        # Each own pixel is written once (padding goes to the sink row).
        out_rows.index_copy_(0, patches.write_core,
                             _cast(updated, out.dtype).view(-1, out_rows.shape[1]))
    # The last norm is not masked: its shift reaches every pixel.
    out[:num_rows] += last_bias
    out[num_rows:].zero_()
    return out


def sparse_inverted_residual_stage(x: Tensor, masks: Tensor, blocks: Sequence[ConvWeights],
                                   residuals: Sequence[bool], dilation: int = 1,
                                   clamp: Optional[float] = 6.0) -> Tensor:
    """Run a chain of masked inverted residual blocks on their selected patches.

    Computes what the dense masked path computes (see
    :class:`~sar_backbones.models.layers.inverted_residual.InvertedResidual`),
    convolving only the selected patches of each mask group.

    Args:
        x (Tensor): Input ``(B, C_in, H, W)``.
        masks (Tensor): ``(N, B, G, Kh, Kw)`` patch masks of the ``N`` blocks.
        blocks (Sequence): Per block, its folded ``(weight, bias)`` convolutions.
        residuals (Sequence[bool]): Per block, whether it adds its input.
        dilation (int): Dilation ``d`` of the depthwise convolutions.
        clamp (float, optional): 6 for ReLU6, None for ReLU.

    Returns:
        Tensor: ``(B, C_out, H, W)`` in channels-last memory.
    """
    if len(blocks) != masks.shape[0] or len(residuals) != len(blocks) or not blocks:
        raise ValueError(f'sparse_inverted_residual_stage: {masks.shape[0]} masks, {len(blocks)} '
                         f'blocks and {len(residuals)} residual flags must agree (and be > 0)')
    batch, _, height, width = x.shape
    groups = masks.shape[2]
    layout = patch_layout(height, width, tuple(masks.shape[-2:]), dilation, x.device)
    need_x_window = any(convs[0][0].shape[-1] > 1 for convs in blocks)
    patches = select_patches(masks.flatten(3) != 0, layout, height * width, need_x_window)
    x_flat = to_flat(x)
    for convs, residual, block_patches in zip(blocks, residuals, patches):
        x_flat = sparse_inverted_residual_forward(convs, bool(residual), x_flat, block_patches,
                                                  layout, groups, dilation, clamp)
    channels = x_flat.shape[1]
    return x_flat[:batch * height * width].view(batch, height, width, channels).permute(0, 3, 1, 2)


def stage_weights(blocks: Sequence[torch.nn.Module]) -> Tuple[List[ConvWeights], List[bool]]:
    """Folded weights and residual flags of a stage's refine blocks (``InvertedResidual``)."""
    return [block.sparse_weights() for block in blocks], \
        [block.use_res_connect for block in blocks]
