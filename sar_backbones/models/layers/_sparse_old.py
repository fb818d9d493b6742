"""Sparse inference of the refine branch: gather, convolve, scatter (paper Fig. 3, bottom).

In evaluation the refine branch computes exactly what the dense masked path
computes, but only on the selected patches:

* activations live in a flat channels-last buffer of ``B*H*W + 2`` rows; row
  ``B*H*W`` is all zeros (what a masked-out pixel reads) and row ``B*H*W + 1``
  is a sink for writes that belong to no pixel;
* for each channel group ``g``, the selected patches of all images are stacked
  along the batch dimension (one "mini-batch" per group, Sec. III-C.1);
* a 1x1 convolution is a matrix product on the gathered pixels; a 3x3
  convolution reads a window of ``patch + halo`` pixels in which unselected
  neighbours point at the zero row, which reproduces the masking of the dense
  path without any extra convolution work on the halo;
* where nothing is selected a block outputs ``ReLU(shortcut + b_last)`` (the
  shift of its last, unmasked norm), so the dense part of a block is just the
  shortcut and an addition;
* BatchNorm is folded into the convolutions, and each group runs plain
  (ungrouped) convolutions on its own slice of the weights.
"""
from functools import lru_cache
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import ResidualBlock


class PatchLayout(NamedTuple):
    """Pixel offsets (``y * W + x``) of every patch of a ``Kh x Kw`` grid on ``H x W``.

    Patches follow :func:`~.masking.nearest_source_index`; when ``K`` does not
    divide the size they differ by one pixel and are padded to the largest.
    """
    core: Tensor        # (Kh*Kw, PH, PW) own pixels, -1 for padding
    window: Tensor      # (Kh*Kw, PH+2h, PW+2h) pixels read by a 3x3 conv, -1 outside the map
    window_patch: Tensor  # (Kh*Kw, PH+2h, PW+2h) patch id of each window pixel
    patch_shape: Tuple[int, int]
    window_shape: Tuple[int, int]


def _axis_layout(size: int, cells: int, halo: int) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Per-axis core positions (own or -1), window positions (-1 outside) and window cell ids."""
    index = torch.arange(cells + 1)
    starts = (index * size + cells - 1) // cells  # first pixel y with (y*cells)//size == i
    extent = int((starts[1:] - starts[:-1]).max())
    core = starts[:-1, None] + torch.arange(extent)
    core = torch.where(core < starts[1:, None], core, -1)
    window = starts[:-1, None] - halo + torch.arange(extent + 2 * halo)
    inside = (window >= 0) & (window < size)
    window_cell = window.clamp(0, size - 1) * cells // size
    return core, torch.where(inside, window, -1), window_cell, extent


@lru_cache(maxsize=64)
def patch_layout(height: int, width: int, grid: Tuple[int, int], halo: int,
                 device: torch.device) -> PatchLayout:
    """Cached :class:`PatchLayout` for one feature size, patch grid and halo."""
    rows_core, rows_win, rows_cell, ph = _axis_layout(height, grid[0], halo)
    cols_core, cols_win, cols_cell, pw = _axis_layout(width, grid[1], halo)

    def combine(rows: Tensor, cols: Tensor) -> Tensor:
        pixel = rows[:, None, :, None] * width + cols[None, :, None, :]
        valid = (rows[:, None, :, None] >= 0) & (cols[None, :, None, :] >= 0)
        return torch.where(valid, pixel, -1).flatten(0, 1)

    window_patch = (rows_cell[:, None, :, None] * grid[1] + cols_cell[None, :, None, :]).flatten(0, 1)
    return PatchLayout(
        core=combine(rows_core, cols_core).to(device),
        window=combine(rows_win, cols_win).to(device),
        window_patch=window_patch.to(device),
        patch_shape=(ph, pw),
        window_shape=(ph + 2 * halo, pw + 2 * halo))


class GroupPatches(NamedTuple):
    """Row indices into a flat buffer for the selected patches of one group."""
    count: int
    read_core: Tensor    # (n*PH*PW,) own pixels, zero row for padding
    write_core: Tensor   # (n*PH*PW,) own pixels, sink row for padding
    read_window: Tensor  # (n*(PH+2h)*(PW+2h),) selected pixels, zero row elsewhere


def select_patches(group_mask: Tensor, layout: PatchLayout, pixels_per_image: int) -> GroupPatches:
    """Indices of the patches selected in ``group_mask`` (``(B, Kh*Kw)`` bool)."""
    zero_row = group_mask.shape[0] * pixels_per_image
    sink_row = zero_row + 1
    image, patch = group_mask.nonzero(as_tuple=True)
    offset = (image * pixels_per_image).view(-1, 1, 1)
    core = layout.core[patch]
    window = layout.window[patch]
    # A window pixel holds data only where its own patch is selected too.
    neighbour_selected = group_mask[image.view(-1, 1, 1), layout.window_patch[patch]]
    return GroupPatches(
        count=int(patch.numel()),
        read_core=torch.where(core >= 0, core + offset, zero_row).flatten(),
        write_core=torch.where(core >= 0, core + offset, sink_row).flatten(),
        read_window=torch.where((window >= 0) & neighbour_selected, window + offset, zero_row).flatten())


def _group_slice(channels: int, groups: int, group: int) -> slice:
    width = channels // groups
    return slice(group * width, (group + 1) * width)


def _run_group(block: ResidualBlock, x_flat: Tensor, patches: GroupPatches, layout: PatchLayout,
               group: int) -> Tensor:
    """The block's residual function on the selected patches of one group: ``(n*PH*PW, C_out/G)``."""
    convs, _ = block.folded()
    groups = block.groups
    n = patches.count
    current = None  # activations of the patches, (n*PH*PW, C) in core layout
    for index, (conv, spec) in enumerate(zip(convs, block.specs)):
        is_last = index == len(convs) - 1
        rows = _group_slice(spec.out_channels, groups, group)
        weight = conv.weight[rows].to(x_flat.dtype)
        bias = None if is_last else conv.bias[rows].to(x_flat.dtype)  # last bias is added densely
        in_cols = _group_slice(spec.in_channels, groups, group)
        if conv.kernel_size == 1:
            inputs = current if current is not None else \
                x_flat[:, in_cols].index_select(0, patches.read_core)
            weight_2d = weight.flatten(1).t()
            out = torch.mm(inputs, weight_2d) if bias is None else torch.addmm(bias, inputs, weight_2d)
        else:
            if current is None:
                source = x_flat[:, in_cols]
            else:
                # Scatter to a full-size buffer so that neighbouring selected
                # patches see each other's values through the halo.
                source = current.new_empty(x_flat.shape[0], current.shape[1])
                source[-2].zero_()
                source.index_copy_(0, patches.write_core, current)
            window = source.index_select(0, patches.read_window)
            window = window.view(n, *layout.window_shape, -1).permute(0, 3, 1, 2)
            out = F.conv2d(window, weight, bias, dilation=conv.dilation)
            out = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
        current = out if is_last else F.relu(out, inplace=True)
    return current


def sparse_block_forward(block: ResidualBlock, x_flat: Tensor, mask: Tensor,
                         size: Tuple[int, int]) -> Tensor:
    """One refine block on a flat ``(B*H*W + 2, C)`` buffer; returns the same layout.

    With an identity shortcut the block updates ``x_flat`` in place (after
    all groups have read it), which saves a full-size buffer per block.
    """
    height, width = size
    num_rows = x_flat.shape[0] - 2
    convs, shortcut = block.folded()
    layout = patch_layout(height, width, tuple(mask.shape[-2:]), block.dilation, x_flat.device)
    flat_mask = mask.flatten(2).bool()
    groups = flat_mask.shape[1]
    residuals = []
    for group in range(groups):
        patches = select_patches(flat_mask[:, group], layout, height * width)
        if patches.count:
            residuals.append((group, patches, _run_group(block, x_flat, patches, layout, group)))

    # Everywhere: shortcut + the shift of the last (unmasked) norm.
    last_bias = convs[-1].bias.to(x_flat.dtype)
    if shortcut is None:
        out = x_flat
        out[:num_rows] += last_bias
    else:
        weight, bias = shortcut
        out = x_flat.new_empty(num_rows + 2, block.out_channels)
        torch.addmm((bias + convs[-1].bias).to(x_flat.dtype), x_flat[:num_rows],
                    weight.flatten(1).t().to(x_flat.dtype), out=out[:num_rows])
    # Selected patches: plus the residual function.
    for group, patches, residual in residuals:
        cols = _group_slice(block.out_channels, groups, group)
        # Own pixels are written once each (padding all goes to the sink row),
        # so gather-add-copy is exact and avoids the atomic adds of an
        # accumulating scatter, which contend badly across threads.
        target = out[:, cols]
        updated = target.index_select(0, patches.write_core).add_(residual.to(out.dtype))
        target.index_copy_(0, patches.write_core, updated)
    if block.last_relu:
        out[:num_rows].relu_()
    out[num_rows].zero_()
    return out


def to_flat(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> channels-last rows ``(B*H*W + 2, C)`` with the zero and sink rows."""
    batch, channels, height, width = x.shape
    num_rows = batch * height * width
    x_flat = x.new_empty(num_rows + 2, channels)
    x_flat[:num_rows].view(batch, height, width, channels).copy_(x.permute(0, 2, 3, 1))
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
