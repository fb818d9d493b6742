"""Sparse inference of the refine branch: gather, convolve, scatter (paper Fig. 3, bottom).

In evaluation the refine branch computes exactly what the dense masked path
computes, but only on the selected patches:

* activations live in a flat channels-last buffer of ``B*H*W + 2`` rows; row
  ``B*H*W`` is all zeros (what a masked-out pixel reads) and row ``B*H*W + 1``
  is a sink for writes that belong to no pixel;
* for each channel group ``g``, the pixels of its selected patches (of all
  images) are one "mini-batch" of rows (Sec. III-C.1), and every convolution
  of the block is a matrix product on them with that group's slice of the
  weights: a 1x1 convolution reads the rows themselves, a 3x3 convolution
  reads each row's nine taps (im2col by one gather), where a tap outside the
  map or in an unselected patch reads a zero row, which reproduces the
  masking of the dense path exactly;
* intermediate activations stay in a compact buffer of the selected pixels
  (row 0 is the zero row), so a block touches full-size memory only to read
  its input and to add its residual;
* where nothing is selected a block outputs ``ReLU(shortcut + b_last)`` (the
  shift of its last, unmasked norm), so the dense part of a block is just the
  shortcut and an addition;
* BatchNorm is folded into the convolutions.

Few, large operations matter more than FLOPs here: a stage-1 patch is 16
pixels, and per-operation overhead would otherwise dominate. Patch indices are
therefore computed for all groups at once, and each group runs one gather and
one matrix product per convolution.
"""
import weakref
from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import FoldedConv, ResidualBlock
from .memory_format import copy_to_rows_


class PatchLayout(NamedTuple):
    """Pixels of every patch of a ``Kh x Kw`` grid on ``H x W``, and their 3x3 taps.

    Patches follow :func:`~.masking.nearest_source_index`; when ``K`` does not
    divide the size they differ by one pixel and are padded to the largest
    (``PH x PW``). Pixels are offsets ``y * W + x`` within an image.
    """
    core: Tensor       # (Kh*Kw, PH*PW) own pixels, -1 for padding
    taps: Tensor       # (Kh*Kw, PH*PW, 9) pixel of each dilated 3x3 tap, -1 outside/padding
    tap_patch: Tensor  # (Kh*Kw, PH*PW, 9) patch that owns the tap pixel
    tap_local: Tensor  # (Kh*Kw, PH*PW, 9) the tap pixel's position in that patch's core
    pixels_per_patch: int


def _axis_cells(size: int, cells: int) -> Tuple[Tensor, int]:
    """First pixel of each of ``cells`` cells along an axis, and the largest cell extent."""
    index = torch.arange(cells + 1)
    starts = (index * size + cells - 1) // cells  # first y with (y * cells) // size == i
    return starts, int((starts[1:] - starts[:-1]).max())


@lru_cache(maxsize=64)
def patch_layout(height: int, width: int, grid: Tuple[int, int], dilation: int,
                 device: torch.device) -> PatchLayout:
    """Cached :class:`PatchLayout` for one feature size, patch grid and dilation."""
    row_starts, patch_h = _axis_cells(height, grid[0])
    col_starts, patch_w = _axis_cells(width, grid[1])
    # (Kh*Kw, PH, PW) coordinates of each patch's core pixels.
    rows = row_starts[:-1, None] + torch.arange(patch_h)  # (Kh, PH)
    cols = col_starts[:-1, None] + torch.arange(patch_w)  # (Kw, PW)
    own_rows, own_cols = rows < row_starts[1:, None], cols < col_starts[1:, None]
    rows, own_rows = rows[:, None, :, None], own_rows[:, None, :, None]
    cols, own_cols = cols[None, :, None, :], own_cols[None, :, None, :]
    own = own_rows & own_cols
    rows, cols, own = (t.flatten(0, 1) for t in torch.broadcast_tensors(rows, cols, own))
    core = torch.where(own, rows * width + cols, -1).flatten(1)

    # (Kh*Kw, PH, PW, 9) coordinates of the dilated 3x3 taps, k = 3 * ky + kx.
    offsets = torch.arange(-1, 2) * dilation
    tap_rows = (rows[..., None, None] + offsets[:, None]).expand(*rows.shape, 3, 3).flatten(-2)
    tap_cols = (cols[..., None, None] + offsets).expand(*cols.shape, 3, 3).flatten(-2)
    inside = own[..., None] & (tap_rows >= 0) & (tap_rows < height) & (tap_cols >= 0) \
        & (tap_cols < width)
    tap_rows, tap_cols = tap_rows.clamp(0, height - 1), tap_cols.clamp(0, width - 1)
    cell_rows, cell_cols = tap_rows * grid[0] // height, tap_cols * grid[1] // width
    tap_local = (tap_rows - row_starts[cell_rows]) * patch_w + tap_cols - col_starts[cell_cols]

    def per_patch(t: Tensor) -> Tensor:  # (Kh*Kw, PH, PW, 9) -> (Kh*Kw, PH*PW, 9)
        return t.flatten(1, 2).to(device)

    return PatchLayout(
        core=core.to(device),
        taps=per_patch(torch.where(inside, tap_rows * width + tap_cols, -1)),
        tap_patch=per_patch(cell_rows * grid[1] + cell_cols),
        tap_local=per_patch(tap_local),
        pixels_per_patch=patch_h * patch_w)


class GroupPatches(NamedTuple):
    """Row indices of the selected patches of one group.

    ``x`` rows index the flat full-size buffer, ``compact`` rows index the
    group's buffer of selected pixels, whose row 0 is zeros.
    """
    count: int               # selected patches n
    read_core: Tensor        # (n*PP,) x rows of the own pixels, zero row for padding
    write_core: Tensor       # (n*PP,) x rows of the own pixels, sink row for padding
    x_taps: Tensor           # (n*PP*9,) x rows of the 3x3 taps, zero row if masked out
    compact_taps: Tensor     # (n*PP*9,) compact rows of the 3x3 taps, 0 if masked out


def select_patches(mask: Tensor, layout: PatchLayout, pixels_per_image: int,
                   need_x_taps: bool) -> List[GroupPatches]:
    """Indices of the selected patches of every group of ``mask`` (``(B, G, Kh*Kw)`` bool)."""
    batch, groups, num_patches = mask.shape
    zero_row, sink_row = batch * pixels_per_image, batch * pixels_per_image + 1
    per_group = mask.transpose(0, 1).reshape(groups, batch * num_patches)
    counts = per_group.sum(1).tolist()
    group, key = per_group.nonzero(as_tuple=True)  # ordered by group, then image and patch
    image, patch = key.div(num_patches, rounding_mode='floor'), key.remainder(num_patches)
    # Position of each selected (image, patch) among its group's selections.
    rank = per_group.cumsum(1).sub_(1)

    core = layout.core[patch]
    offset = (image * pixels_per_image)[:, None]
    read_core = torch.where(core >= 0, core + offset, zero_row)
    write_core = torch.where(core >= 0, core + offset, sink_row)
    # A tap holds data only where the patch it falls in is selected for the group.
    tap_key = layout.tap_patch[patch] + (image * num_patches)[:, None, None]
    group_index = group[:, None, None]
    tap_valid = (layout.taps[patch] >= 0) & per_group[group_index, tap_key]
    pixels = layout.pixels_per_patch
    compact_taps = torch.where(tap_valid, rank[group_index, tap_key] * pixels
                               + layout.tap_local[patch] + 1, 0)
    x_taps = torch.where(tap_valid, layout.taps[patch] + offset[..., None], zero_row) \
        if need_x_taps else core.new_empty(0)

    def split(t: Tensor, per_patch: int) -> Sequence[Tensor]:
        return t.flatten().split([n * per_patch for n in counts])

    return [
        GroupPatches(n, *parts) for n, *parts in zip(
            counts, split(read_core, pixels), split(write_core, pixels),
            split(x_taps, pixels * 9) if need_x_taps else [x_taps] * groups,
            split(compact_taps, pixels * 9))
    ]


class GroupConv(NamedTuple):
    """One folded convolution of one group as a matrix product: ``rows @ weight + bias``."""
    weight: Tensor  # (k*k*C_in/G, C_out/G)
    bias: Tensor    # (C_out/G,)
    kernel_size: int


_group_convs_cache: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def _group_convs(block: ResidualBlock, folded: List[FoldedConv]) -> List[List[GroupConv]]:
    """Per group, the block's folded convolutions as im2col weight matrices (cached)."""
    cached = _group_convs_cache.get(block)
    if cached is not None and cached[0] is folded:
        return cached[1]
    groups = block.groups
    per_group: List[List[GroupConv]] = [[] for _ in range(groups)]
    for conv in folded:
        for group, (weight, bias) in enumerate(zip(conv.weight.chunk(groups),
                                                   conv.bias.chunk(groups))):
            # (C_out, C_in, kh, kw) -> (kh, kw, C_in, C_out): tap-major, as gathered.
            matrix = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()
            per_group[group].append(GroupConv(matrix, bias, conv.kernel_size))
    _group_convs_cache[block] = (folded, per_group)
    return per_group


def _run_group(convs: List[GroupConv], x_flat: Tensor, in_cols: slice, patches: GroupPatches,
               residual_base: Tensor) -> Tensor:
    """The block's residual function on one group's patches, added to ``residual_base``.

    Returns ``residual_base + F(x)`` for the group's own pixels, ``(n*PP, C_out/G)``.
    """
    rows = patches.read_core.numel()
    compact: Optional[Tensor] = None  # (1 + n*PP, C): zero row, then the selected pixels
    for index, conv in enumerate(convs):
        weight = conv.weight.to(x_flat.dtype)
        if conv.kernel_size == 1:
            inputs = compact[1:] if compact is not None else \
                x_flat[:, in_cols].index_select(0, patches.read_core)
        elif compact is not None:
            inputs = compact.index_select(0, patches.compact_taps).view(rows, -1)
        else:
            inputs = x_flat[:, in_cols].index_select(0, patches.x_taps).view(rows, -1)
        if index == len(convs) - 1:
            # The last bias is added densely; the residual add fuses into the product.
            return torch.addmm(residual_base, inputs, weight)
        compact = inputs.new_empty(1 + rows, weight.shape[1])
        compact[0].zero_()
        torch.addmm(conv.bias.to(x_flat.dtype), inputs, weight, out=compact[1:])
        compact[1:].relu_()
    raise AssertionError('a block has at least one convolution')


def sparse_block_forward(block: ResidualBlock, x_flat: Tensor, mask: Tensor,
                         size: Tuple[int, int]) -> Tensor:
    """One refine block on a flat ``(B*H*W + 2, C)`` buffer; returns the same layout.

    With an identity shortcut the block updates ``x_flat`` in place (after
    all groups have read it), which saves a full-size buffer per block.
    """
    height, width = size
    num_rows = x_flat.shape[0] - 2
    folded, shortcut = block.folded()
    group_convs = _group_convs(block, folded)
    layout = patch_layout(height, width, tuple(mask.shape[-2:]), block.dilation, x_flat.device)
    groups = mask.shape[1]
    all_patches = select_patches(mask.flatten(2).bool(), layout, height * width,
                                 need_x_taps=folded[0].kernel_size > 1)
    in_width, out_width = block.in_channels // groups, block.out_channels // groups

    # The dense part first (shortcut + the shift of the last, unmasked norm)
    # when it does not overwrite the input the groups still have to read.
    last_bias = folded[-1].bias.to(x_flat.dtype)
    out = None
    if shortcut is not None:
        weight, bias = shortcut
        out = x_flat.new_empty(num_rows + 2, block.out_channels)
        torch.addmm((bias + last_bias).to(x_flat.dtype), x_flat[:num_rows],
                    weight.flatten(1).t().to(x_flat.dtype), out=out[:num_rows])
    updates = []
    for group, patches in enumerate(all_patches):
        if not patches.count:
            continue
        out_cols = slice(group * out_width, (group + 1) * out_width)
        if out is not None:
            base = out[:, out_cols].index_select(0, patches.write_core)
        else:  # identity shortcut: x + b_last, added below to every pixel
            base = x_flat[:, out_cols].index_select(0, patches.write_core)
        in_cols = slice(group * in_width, (group + 1) * in_width)
        updates.append((out_cols, patches.write_core,
                        _run_group(group_convs[group], x_flat, in_cols, patches, base)))
    if out is None:
        out = x_flat
        out[:num_rows] += last_bias
    # Own pixels are written once each (padding all goes to the sink row), so
    # gather-add-copy is exact and avoids the atomic adds of an accumulating
    # scatter, which contend badly across threads.
    for out_cols, write_core, updated in updates:
        if out is x_flat:
            updated += last_bias[out_cols]
        out[:, out_cols].index_copy_(0, write_core, updated.to(out.dtype))
    if block.last_relu:
        out[:num_rows].relu_()
    out[num_rows].zero_()
    return out


def to_flat(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> channels-last rows ``(B*H*W + 2, C)`` with the zero and sink rows."""
    batch, channels, height, width = x.shape
    num_rows = batch * height * width
    x_flat = x.new_empty(num_rows + 2, channels)
    copy_to_rows_(x_flat[:num_rows], x)
    x_flat[num_rows:].zero_()
    return x_flat


def sparse_refine_forward(blocks: Sequence[ResidualBlock], x: Tensor, masks: List[Tensor]) -> Tensor:
    """Run a chain of refine blocks sparsely; returns ``(B, C, H, W)`` (channels-last memory)."""
    batch, _, height, width = x.shape
    x_flat = to_flat(x)
    for block, mask in zip(blocks, masks):
        x_flat = sparse_block_forward(block, x_flat, mask, (height, width))
    channels = x_flat.shape[1]  # explicit: -1 cannot be inferred for an empty batch
    return x_flat[:batch * height * width].view(batch, height, width, channels).permute(0, 3, 1, 2)
