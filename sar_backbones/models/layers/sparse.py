"""Sparse inference of the refine branch: gather, convolve, scatter (paper Fig. 3, bottom).

In evaluation the refine branch computes exactly what the dense masked path
computes, but only on the selected patches:

* activations live in a flat channels-last buffer of ``B*H*W + 2`` rows; row
  ``B*H*W`` is all zeros (what a masked-out pixel reads) and row ``B*H*W + 1``
  is a sink for writes that belong to no pixel;
* for each channel group ``g``, the pixels of its selected patches (of all
  images) are one "mini-batch" (Sec. III-C.1) run through that group's slice
  of the weights: a 1x1 convolution is a matrix product on the pixel rows, a
  3x3 convolution runs on the gathered windows (patch + a halo of ``d``
  pixels), in which pixels outside the map or in unselected patches read a
  zero row, which reproduces the masking of the dense path exactly;
* intermediate activations stay in a compact buffer of the selected pixels
  (row 0 is the zero row), so a block touches full-size memory only to read
  its input and to add its residual;
* where nothing is selected a block outputs ``ReLU(shortcut + b_last)`` (the
  shift of its last, unmasked norm), so the dense part of a block is just the
  shortcut and an addition;
* BatchNorm is folded into the convolutions.

A stage-1 patch is only 16 pixels, so the number of operations matters as
much as their FLOPs: patch indices are computed for all blocks and groups of
a stage at once, each group runs one gather and one convolution per
convolution of the block, and the dense part of a block is one pass over the
map.
(An im2col gather + matrix product for the 3x3 convolutions was tried and is
~4% slower end to end than oneDNN on the windows.)
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
    """Pixels of every patch of a ``Kh x Kw`` grid on ``H x W``, and the windows a 3x3 conv reads.

    Patches follow :func:`~.masking.nearest_source_index`; when ``K`` does not
    divide the size they differ by one pixel and are padded to the largest
    (``PH x PW``). A window is the patch grown by the dilation ``d`` on every
    side. Pixels are offsets ``y * W + x`` within an image.
    """
    core: Tensor           # (Kh*Kw, PH*PW) own pixels, -1 for padding
    window: Tensor         # (Kh*Kw, (PH+2d)*(PW+2d)) window pixels, -1 outside the map
    window_patch: Tensor   # (Kh*Kw, (PH+2d)*(PW+2d)) patch that owns each window pixel
    window_local: Tensor   # (Kh*Kw, (PH+2d)*(PW+2d)) its position in that patch's core
    patch_shape: Tuple[int, int]
    window_shape: Tuple[int, int]


def _axis_cells(size: int, cells: int) -> Tuple[Tensor, int]:
    """First pixel of each of ``cells`` cells along an axis, and the largest cell extent."""
    index = torch.arange(cells + 1)
    starts = (index * size + cells - 1) // cells  # first y with (y * cells) // size == i
    return starts, int((starts[1:] - starts[:-1]).max())


def _per_patch(rows: Tensor, cols: Tensor, valid_rows: Tensor, valid_cols: Tensor,
               width: int) -> Tensor:
    """``(Kh*Kw, len_r*len_c)`` pixel offsets from per-axis ``(K, len)`` coordinates, -1 if invalid."""
    pixel = rows[:, None, :, None] * width + cols[None, :, None, :]
    valid = valid_rows[:, None, :, None] & valid_cols[None, :, None, :]
    return torch.where(valid, pixel, -1).flatten(0, 1).flatten(1)


@lru_cache(maxsize=64)
def patch_layout(height: int, width: int, grid: Tuple[int, int], dilation: int,
                 device: torch.device) -> PatchLayout:
    """Cached :class:`PatchLayout` for one feature size, patch grid and dilation."""
    row_starts, patch_h = _axis_cells(height, grid[0])
    col_starts, patch_w = _axis_cells(width, grid[1])
    core_rows = row_starts[:-1, None] + torch.arange(patch_h)  # (Kh, PH)
    core_cols = col_starts[:-1, None] + torch.arange(patch_w)  # (Kw, PW)
    win_rows = row_starts[:-1, None] - dilation + torch.arange(patch_h + 2 * dilation)
    win_cols = col_starts[:-1, None] - dilation + torch.arange(patch_w + 2 * dilation)
    core = _per_patch(core_rows, core_cols, core_rows < row_starts[1:, None],
                      core_cols < col_starts[1:, None], width)
    window = _per_patch(win_rows, win_cols, (win_rows >= 0) & (win_rows < height),
                        (win_cols >= 0) & (win_cols < width), width)
    # Owner patch and position inside it, per axis, for the (clamped) window pixels.
    win_rows, win_cols = win_rows.clamp(0, height - 1), win_cols.clamp(0, width - 1)
    cell_rows, cell_cols = win_rows * grid[0] // height, win_cols * grid[1] // width
    local_rows, local_cols = win_rows - row_starts[cell_rows], win_cols - col_starts[cell_cols]
    window_patch = (cell_rows[:, None, :, None] * grid[1] + cell_cols[None, :, None, :])
    window_local = (local_rows[:, None, :, None] * patch_w + local_cols[None, :, None, :])
    return PatchLayout(
        core=core.to(device),
        window=window.to(device),
        window_patch=window_patch.flatten(0, 1).flatten(1).to(device),
        window_local=window_local.flatten(0, 1).flatten(1).to(device),
        patch_shape=(patch_h, patch_w),
        window_shape=(patch_h + 2 * dilation, patch_w + 2 * dilation))


class GroupPatches(NamedTuple):
    """Row indices of the selected patches of one group.

    ``x`` rows index the flat full-size buffer, ``compact`` rows index the
    group's buffer of selected pixels, whose row 0 is zeros.
    """
    count: int               # selected patches n
    read_core: Tensor        # (n*PP,) x rows of the own pixels, zero row for padding
    write_core: Tensor       # (n*PP,) x rows of the own pixels, sink row for padding
    x_window: Tensor         # (n*WP,) x rows of the window pixels, zero row if masked out
    compact_window: Tensor   # (n*WP,) compact rows of the window pixels, 0 if masked out


def select_patches(masks: Tensor, layout: PatchLayout, pixels_per_image: int,
                   need_x_window: bool) -> List[List[GroupPatches]]:
    """Indices of the selected patches of every block and group.

    Args:
        masks (Tensor): ``(N, B, G, Kh*Kw)`` bool, the masks of the ``N``
            blocks of a stage, which share one layout: one pass for all of
            them costs about as much as one pass per block.
        layout (PatchLayout): The patches of the stage's feature map.
        pixels_per_image (int): ``H*W``.
        need_x_window (bool): Whether the first convolution is 3x3, i.e.
            reads windows of the full-size input.

    Returns:
        list[list[GroupPatches]]: Per block, per group.
    """
    blocks, batch, groups, num_patches = masks.shape
    zero_row, sink_row = batch * pixels_per_image, batch * pixels_per_image + 1
    # One row per (block, group): the selected (image, patch) pairs.
    selections = masks.transpose(1, 2).reshape(blocks * groups, batch * num_patches)
    counts = selections.sum(1).tolist()
    row, key = selections.nonzero(as_tuple=True)  # ordered by row, then image and patch
    image, patch = key.div(num_patches, rounding_mode='floor'), key.remainder(num_patches)
    # Position of each selected (image, patch) among its row's selections.
    rank = selections.cumsum(1).sub_(1)

    core = layout.core[patch]
    offset = (image * pixels_per_image)[:, None]
    read_core = torch.where(core >= 0, core + offset, zero_row)
    write_core = torch.where(core >= 0, core + offset, sink_row)
    # A window pixel holds data only where the patch it falls in is selected
    # for the same block and group (the masking of the dense path).
    window = layout.window[patch]
    window_key = layout.window_patch[patch] + (image * num_patches)[:, None]
    valid = (window >= 0) & selections[row[:, None], window_key]
    compact_window = torch.where(
        valid, rank[row[:, None], window_key] * core.shape[1] + layout.window_local[patch] + 1, 0)
    x_window = torch.where(valid, window + offset, zero_row) if need_x_window \
        else core.new_empty(0)

    def split(t: Tensor) -> Sequence[Tensor]:
        return t.flatten().split([n * t.shape[1] for n in counts])

    patches = [
        GroupPatches(n, *parts) for n, *parts in zip(
            counts, split(read_core), split(write_core),
            split(x_window) if need_x_window else [x_window] * len(counts), split(compact_window))
    ]
    return [patches[block * groups:(block + 1) * groups] for block in range(blocks)]


class GroupConv(NamedTuple):
    """One folded convolution of one group, its weight channels-last like the gathered inputs."""
    weight: Tensor  # (C_out/G, C_in/G, k, k)
    bias: Tensor    # (C_out/G,)
    kernel_size: int
    dilation: int


_group_convs_cache: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def _group_convs(block: ResidualBlock, folded: List[FoldedConv],
                 shortcut: Optional[Tuple[Tensor, Tensor]]
                 ) -> Tuple[List[List[GroupConv]], Optional[GroupConv]]:
    """Per group, the block's folded convolutions, and its folded 1x1 shortcut.

    ``folded`` and ``shortcut`` are ``block.folded()``; the result is cached
    until that changes. Weights are channels-last, the layout of the gathered
    inputs, so that oneDNN need not reorder them on every call.
    """
    cached = _group_convs_cache.get(block)
    if cached is not None and cached[0] is folded:
        return cached[1]
    groups = block.groups
    per_group: List[List[GroupConv]] = [[] for _ in range(groups)]
    for conv in folded:
        for group, (weight, bias) in enumerate(zip(conv.weight.chunk(groups),
                                                   conv.bias.chunk(groups))):
            weight = weight.contiguous(memory_format=torch.channels_last)
            per_group[group].append(GroupConv(weight, bias, conv.kernel_size, conv.dilation))
    dense_shortcut = None
    if shortcut is not None:
        # The last norm's shift applies at every pixel: fold it into the shortcut.
        weight, bias = shortcut
        dense_shortcut = GroupConv(weight.contiguous(memory_format=torch.channels_last),
                                   bias + folded[-1].bias, 1, 1)
    result = (per_group, dense_shortcut)
    _group_convs_cache[block] = (folded, result)
    return result


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without a dispatcher round trip when it is a no-op (hot loop)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def conv1x1_rows(rows: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 convolution of pixel rows ``(M, C_in)`` -> ``(M, C_out)``.

    Computed by ``F.conv2d`` on a ``(1, C_in, M, 1)`` channels-last view
    rather than by ``torch.addmm``, so that PyTorch picks the kernel it picks
    for the dense network's 1x1 convolutions: oneDNN as soon as several
    threads run, ~2x faster than MKL's sgemm on these shapes (THNN's gemm on
    one thread, the same speed as ``addmm``).
    """
    if rows.shape[0] == 0:
        return rows.new_empty(0, weight.shape[0])
    out = F.conv2d(rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2),
                   _cast(weight, rows.dtype), None if bias is None else _cast(bias, rows.dtype))
    return out.permute(0, 2, 3, 1).reshape(rows.shape[0], -1)


def _run_group(convs: List[GroupConv], x_flat: Tensor, in_cols: slice, patches: GroupPatches,
               layout: PatchLayout, residual_base: Tensor) -> Tensor:
    """The block's residual function on one group's patches, added to ``residual_base``.

    1x1 convolutions run on the pixel rows; 3x3 convolutions on the gathered
    ``(PH+2d) x (PW+2d)`` windows of the patches.

    Returns ``residual_base + F(x)`` for the group's own pixels, ``(n*PP, C_out/G)``.
    """
    n, rows = patches.count, patches.read_core.numel()
    hidden: Optional[Tensor] = None  # (n*PP, C) activation of the selected pixels
    compact: Optional[Tensor] = None  # the same after a zero row, for window gathers
    for index, conv in enumerate(convs):
        is_last = index == len(convs) - 1
        bias = None if is_last else conv.bias  # the last one is added densely
        if conv.kernel_size == 1:
            inputs = hidden if hidden is not None else \
                x_flat[:, in_cols].index_select(0, patches.read_core)
            out = conv1x1_rows(inputs, conv.weight, bias)
        else:
            source, index_rows = (x_flat[:, in_cols], patches.x_window) if hidden is None \
                else (compact, patches.compact_window)
            window = source.index_select(0, index_rows).view(n, *layout.window_shape, -1)
            out = F.conv2d(window.permute(0, 3, 1, 2), _cast(conv.weight, x_flat.dtype),
                           None if bias is None else _cast(bias, x_flat.dtype),
                           dilation=conv.dilation)
            out = out.permute(0, 2, 3, 1).reshape(rows, -1)
        if is_last:
            return out.add_(residual_base)
        if convs[index + 1].kernel_size == 1:  # read as rows: no zero row needed
            hidden = out.clamp_min_(0)
        else:
            compact = out.new_empty(1 + rows, out.shape[1])
            compact[0].zero_()
            hidden = torch.clamp_min(out, 0, out=compact[1:])
    raise AssertionError('a block has at least one convolution')


def add_relu_(x: Tensor, bias: Tensor) -> Tensor:
    """``x = ReLU(x + bias)`` in place, in one pass where ATen has the fused kernel.

    ``aten::_add_relu_`` (the kernel behind TorchScript's add-ReLU fusion)
    exists for float32/float64 CPU tensors only; elsewhere two passes.
    """
    if x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64):
        return torch.ops.aten._add_relu_(x, bias)
    return x.add_(bias).relu_()


def sparse_block_forward(block: ResidualBlock, x_flat: Tensor, all_patches: List[GroupPatches],
                         layout: PatchLayout) -> Tensor:
    """One refine block on a flat ``(B*H*W + 2, C)`` buffer; returns the same layout.

    ``all_patches`` are the block's selected patches per group
    (:func:`select_patches`). With an identity shortcut the block updates
    ``x_flat`` in place (after all groups have read it), which saves a
    full-size buffer per block.
    """
    num_rows = x_flat.shape[0] - 2
    folded, folded_shortcut = block.folded()
    group_convs, shortcut = _group_convs(block, folded, folded_shortcut)
    groups = len(all_patches)
    in_width, out_width = block.in_channels // groups, block.out_channels // groups
    # The shortcut is the identity, updated in place once all groups have read
    # their input, or a folded 1x1 conv whose bias carries the last norm's
    # shift b_last; the conv runs over all rows, the zero and sink rows too,
    # so that its result is the next buffer as it is (zero row reset below).
    identity = shortcut is None
    out = x_flat if identity else conv1x1_rows(x_flat, shortcut.weight, shortcut.bias)
    updates = []
    for group, patches in enumerate(all_patches):
        if not patches.count:
            continue
        out_cols = slice(group * out_width, (group + 1) * out_width)
        base = out[:, out_cols].index_select(0, patches.write_core)
        in_cols = slice(group * in_width, (group + 1) * in_width)
        updates.append((out_cols, patches.write_core,
                        _run_group(group_convs[group], x_flat, in_cols, patches, layout, base)))
    # Own pixels are written once each (padding all goes to the sink row), so
    # gather-add-copy is exact and avoids the atomic adds of an accumulating
    # scatter, which contend badly across threads.
    for out_cols, write_core, updated in updates:
        out[:, out_cols].index_copy_(0, write_core, _cast(updated, out.dtype))
    # One pass over the map: b_last for the identity shortcut (every pixel,
    # the refined ones too: their last conv ran without bias), then the ReLU.
    pixels = out[:num_rows]
    if identity and block.last_relu:
        add_relu_(pixels, _cast(folded[-1].bias, out.dtype))
    elif identity:
        pixels += _cast(folded[-1].bias, out.dtype)
    elif block.last_relu:
        pixels.relu_()
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
    """Run a chain of refine blocks sparsely; returns ``(B, C, H, W)`` (channels-last memory).

    The blocks of a stage share the patch layout (same map, grid and
    dilation), so their patch indices are computed in one pass.
    """
    batch, _, height, width = x.shape
    first = blocks[0]
    if any(block.dilation != first.dilation or block.groups != first.groups for block in blocks):
        raise ValueError('the refine blocks of a stage must share their dilation and groups')
    layout = patch_layout(height, width, tuple(masks[0].shape[-2:]), first.dilation, x.device)
    patches = select_patches(torch.stack(masks).flatten(3).bool(), layout, height * width,
                             need_x_window=first.specs[0].kernel_size > 1)
    x_flat = to_flat(x)
    for block, block_patches in zip(blocks, patches):
        x_flat = sparse_block_forward(block, x_flat, block_patches, layout)
    channels = x_flat.shape[1]  # explicit: -1 cannot be inferred for an empty batch
    return x_flat[:batch * height * width].view(batch, height, width, channels).permute(0, 3, 1, 2)
