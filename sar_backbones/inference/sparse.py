"""Sparse inference of the refine branch: gather, convolve, scatter (paper Fig. 3, bottom).

In evaluation the refine branch computes exactly what the dense masked path
computes, but only on the selected patches:

* activations live in a flat channels-last buffer of ``B*H*W + 2`` rows; row
  ``B*H*W`` is all zeros (what a masked-out pixel reads) and row ``B*H*W + 1``
  is a sink for writes that belong to no pixel;
* the selected patches of each channel group ``g`` (of all images) form one
  "mini-batch" (Sec. III-C.1). The ``G`` mini-batches of a block run as one
  batched product: slot ``i`` of the batch holds, in the channels of group
  ``g``, the ``i``-th patch selected for ``g``, so that the block's own
  grouped convolutions (``groups=G``, or a multiple of ``G`` such as
  SAR-ResNeXt's cardinality) apply each group's weights to its own
  patches in one call. Groups with fewer patches are padded to the largest
  count with patches that read zeros and write to the sink row;
* a 1x1 convolution is a grouped matrix product on the pixel rows, a 3x3
  convolution runs on the gathered windows (patch + a halo of ``d`` pixels),
  in which pixels outside the map or in unselected patches read a zero row,
  which reproduces the masking of the dense path exactly;
* intermediate activations stay in a compact buffer of the selected pixels
  (row 0 is the zero row), so a block touches full-size memory only to read
  its input and to add its residual;
* where nothing is selected a block outputs ``ReLU(shortcut + b_last)`` (the
  shift of its last, unmasked norm), so the dense part of a block is just the
  shortcut and an addition;
* BatchNorm is folded into the convolutions (once, by the deploy step, see
  :mod:`sar_backbones.inference.deploy`).

Gathers and scatters address a buffer of ``C`` channels as ``(rows*G, C/G)``:
row ``r`` of group ``g`` is row ``r*G + g`` of that view, so one
``index_select``/``index_copy_`` moves the data of every group.

A stage-1 patch is only 16 pixels, so the number of operations matters as
much as their FLOPs: patch indices are computed for all blocks and groups of
a stage at once, each convolution of a block is one gather and one call for
all groups, and the dense part of a block is one pass over the map.
(An im2col gather + matrix product for the 3x3 convolutions was tried and is
~4% slower end to end than oneDNN on the windows.)

The public entry point is :func:`refine_stage`, a pure function of the input,
the stacked masks and the folded weights; :mod:`sar_backbones.inference.ops`
registers it as the custom operator ``sar_backbones::refine_stage``.
"""
from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_format import copy_to_rows_


class PatchLayout(NamedTuple):
    """Pixels of every patch of a ``Kh x Kw`` grid on ``H x W``, and the windows a 3x3 conv reads.

    Patches follow :func:`~sar_backbones.models.layers.masking.nearest_source_index`;
    when ``K`` does not divide the size they differ by one pixel and are padded
    to the largest (``PH x PW``). A window is the patch grown by the dilation
    ``d`` on every side. Pixels are offsets ``y * W + x`` within an image.
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
    """``(Kh*Kw, len_r*len_c)`` pixel offsets from per-axis ``(K, len)`` coordinates, -1 invalid."""
    pixel = rows[:, None, :, None] * width + cols[None, :, None, :]
    valid = valid_rows[:, None, :, None] & valid_cols[None, :, None, :]
    return torch.where(valid, pixel, -1).flatten(0, 1).flatten(1)


@lru_cache(maxsize=64)
def patch_layout(height: int, width: int, grid: Tuple[int, int], dilation: int,
                 device: torch.device) -> PatchLayout:
    """:class:`PatchLayout` for one feature size, patch grid and dilation (memoised by shape)."""
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


class BlockPatches(NamedTuple):
    """Gather/scatter rows of one block's selected patches, all groups interleaved.

    Every index addresses a buffer of ``C`` channels viewed as
    ``(rows*G, C/G)`` (row ``r`` of group ``g`` at ``r*G + g``) and lists slot
    by slot, pixel by pixel, group by group: gathering it gives the
    ``(n*pixels, C)`` rows of the batched product directly.
    """
    slots: int               # n: patches per group, padded to the largest group
    read_core: Tensor        # (n*PP*G,) x rows of the own pixels, zero row for padding
    write_core: Tensor       # (n*PP*G,) x rows of the own pixels, sink row for padding
    x_window: Tensor         # (n*WP*G,) x rows of the window pixels, zero row if masked out
    compact_window: Tensor   # (n*WP*G,) compact rows of the window pixels, 0 if masked out


def select_patches(masks: Tensor, layout: PatchLayout, pixels_per_image: int,
                   need_x_window: bool) -> List[BlockPatches]:
    """Indices of the selected patches of every block, groups batched.

    Args:
        masks (Tensor): ``(N, B, G, Kh*Kw)`` bool, the masks of the ``N``
            blocks of a stage, which share one layout: one pass for all of
            them costs about as much as one pass per block.
        layout (PatchLayout): The patches of the stage's feature map.
        pixels_per_image (int): ``H*W``.
        need_x_window (bool): Whether the first convolution is 3x3, i.e.
            reads windows of the full-size input.

    Returns:
        list[BlockPatches]: One per block.
    """
    blocks, batch, groups, num_patches = masks.shape
    device = masks.device
    zero_row, sink_row = batch * pixels_per_image, batch * pixels_per_image + 1
    # (block, group, key): the selected (image, patch) pairs of each group.
    selections = masks.permute(0, 2, 1, 3).reshape(blocks, groups, batch * num_patches)
    # Slots per group of each block: the largest group's count (one host sync).
    slots = selections.sum(2).amax(1).tolist() if groups and batch * num_patches else \
        [0] * blocks
    rank = selections.cumsum(2).sub_(1)  # position of a selected key in its group
    block, group, key = selections.nonzero(as_tuple=True)
    # Slot s of block b, group g lives at offsets[b] + s*G + g (groups innermost).
    sizes = [n * groups for n in slots]
    offsets = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    total = sum(sizes)
    slot_key = torch.full((total, ), -1, dtype=torch.long, device=device)
    slot_key[offsets[block] + rank[block, group, key] * groups + group] = key
    slot_block = torch.repeat_interleave(torch.arange(blocks, device=device),
                                         torch.tensor(sizes, device=device), output_size=total)
    slot_group = torch.arange(total, device=device).sub_(offsets[slot_block]).remainder_(groups) \
        if groups else slot_block

    used = slot_key >= 0  # False for the padding slots of the smaller groups
    key = slot_key.clamp_min(0)
    image, patch = key.div(num_patches, rounding_mode='floor'), key.remainder(num_patches)
    offset = (image * pixels_per_image)[:, None]
    column = slot_group[:, None]

    core = layout.core[patch]
    own = (core >= 0) & used[:, None]
    read_core = torch.where(own, core + offset, zero_row) * groups + column
    write_core = torch.where(own, core + offset, sink_row) * groups + column
    # A window pixel holds data only where the patch it falls in is selected
    # for the same block and group (the masking of the dense path).
    window = layout.window[patch]
    window_key = layout.window_patch[patch] + (image * num_patches)[:, None]
    owner = (slot_block[:, None], column, window_key)
    valid = (window >= 0) & used[:, None] & selections[owner]
    compact_window = torch.where(
        valid, rank[owner] * core.shape[1] + layout.window_local[patch] + 1, 0) * groups + column
    x_window = torch.where(valid, window + offset, zero_row) * groups + column \
        if need_x_window else None

    def per_block(t: Optional[Tensor]) -> Sequence[Tensor]:
        """Split by block; order each block's rows slot, pixel, group."""
        if t is None:
            return [core.new_empty(0)] * blocks
        parts = t.split(sizes)
        return [part.view(n, groups, t.shape[1]).transpose(1, 2).flatten()
                for part, n in zip(parts, slots)]

    return [BlockPatches(n, *rows) for n, *rows in zip(
        slots, per_block(read_core), per_block(write_core), per_block(x_window),
        per_block(compact_window))]


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without a dispatcher round trip when it is a no-op (hot loop)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def conv1x1_rows(rows: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int = 1) -> Tensor:
    """A (grouped) 1x1 convolution of pixel rows ``(M, C_in)`` -> ``(M, C_out)``.

    Computed by ``F.conv2d`` on a ``(1, C_in, M, 1)`` channels-last view
    rather than by ``torch.addmm``, so that PyTorch picks the kernel it picks
    for the dense network's 1x1 convolutions: oneDNN as soon as several
    threads run, ~2x faster than MKL's sgemm on these shapes (THNN's gemm on
    one thread, the same speed as ``addmm``).

    With ``G > 1`` groups the product is one batched matrix product over the
    groups (``baddbmm`` on strided views of the rows and the weight): on the
    refine shapes of SAR-ResNet50 it is 10-25 % faster than a grouped 1x1
    ``conv2d`` on one thread and about as fast or faster on two, where
    oneDNN's grouped convolution is no better than one call per group.
    """
    if rows.shape[0] == 0:
        return rows.new_empty(0, weight.shape[0])
    if groups > 1:
        return _grouped_rows_product(rows, _cast(weight, rows.dtype),
                                     None if bias is None else _cast(bias, rows.dtype), groups)
    out = F.conv2d(rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2),
                   _cast(weight, rows.dtype), None if bias is None else _cast(bias, rows.dtype),
                   groups=groups)
    return out.permute(0, 2, 3, 1).reshape(rows.shape[0], -1)


def _grouped_rows_product(rows: Tensor, weight: Tensor, bias: Optional[Tensor],
                          groups: int) -> Tensor:
    """``(M, C_in)`` rows times a grouped 1x1 weight ``(C_out, C_in/G, 1, 1)``, groups batched."""
    num_rows, out_channels = rows.shape[0], weight.shape[0]
    per_group = rows.view(num_rows, groups, -1).transpose(0, 1)  # (G, M, C_in/G)
    matrices = weight.view(groups, out_channels // groups, -1).transpose(1, 2)
    if bias is None:
        product = torch.bmm(per_group, matrices)
    else:
        product = torch.baddbmm(bias.view(groups, 1, -1), per_group, matrices)
    out = rows.new_empty(num_rows, out_channels)
    out.view(num_rows, groups, -1).copy_(product.transpose(0, 1))
    return out


def _group_rows(buffer: Tensor, groups: int) -> Tensor:
    """``(rows, C)`` viewed as ``(rows*G, C/G)``: the unit the gathers and scatters move."""
    return buffer.view(-1, buffer.shape[1] // groups)


def conv_groups(in_channels: int, weight: Tensor) -> int:
    """Groups of a convolution from its input width and weight ``(C_out, C_in/groups, k, k)``.

    The G mask groups fix the gather layout; each convolution may split its
    channels further (SAR-ResNeXt's 3x3 convs have ``groups`` = cardinality,
    a multiple of G), which is exact as long as every conv group lies inside
    one mask group: a gathered slot holds group ``g``'s patch in the channels
    of ``g``, so a conv group reads only data of its own mask group.
    """
    groups = in_channels // weight.shape[1]
    if groups * weight.shape[1] != in_channels or weight.shape[0] % groups:
        raise ValueError(f'refine_stage: a weight of shape {tuple(weight.shape)} does not fit '
                         f'{in_channels} input channels')
    return groups


def residual_function(convs: Sequence[Tuple[Tensor, Tensor]], x_flat: Tensor,
                      patches: BlockPatches, layout: PatchLayout, groups: int, dilation: int,
                      residual_base: Tensor, clamp: Optional[float] = None) -> Tensor:
    """The block's residual function on its selected patches, added to ``residual_base``.

    1x1 convolutions run on the pixel rows; 3x3 convolutions on the gathered
    ``(PH+2d) x (PW+2d)`` windows of the patches; all groups at once. Each
    convolution's own groups follow from its weight (:func:`conv_groups`):
    ``G`` for SAR-ResNet, the cardinality for SAR-ResNeXt's 3x3 convs, one
    per channel for SAR-MobileNetV2's depthwise convs. Between convolutions
    the activation is ReLU (``clamp=None``) or ReLU6 (``clamp=6``); the last
    convolution is linear and its bias is left to the caller.

    Returns ``residual_base + F(x)`` for the own pixels, ``(n*PP, C_out)``.
    """
    n = patches.slots
    rows = patches.read_core.numel() // groups
    hidden: Optional[Tensor] = None  # (n*PP, C) activation of the selected pixels
    compact: Optional[Tensor] = None  # the same after a zero row, for window gathers
    dtype = x_flat.dtype
    for index, (weight, bias) in enumerate(convs):
        is_last = index == len(convs) - 1
        bias = None if is_last else bias  # the last one is added densely
        if weight.shape[-1] == 1:
            inputs = hidden if hidden is not None else \
                _group_rows(x_flat, groups).index_select(0, patches.read_core).view(rows, -1)
            out = conv1x1_rows(inputs, weight, bias, conv_groups(inputs.shape[1], weight))
        else:
            source, index_rows = (x_flat, patches.x_window) if hidden is None \
                else (compact, patches.compact_window)
            window = _group_rows(source, groups).index_select(0, index_rows)
            window = window.view(n, *layout.window_shape, source.shape[1])
            out = F.conv2d(window.permute(0, 3, 1, 2), _cast(weight, dtype),
                           None if bias is None else _cast(bias, dtype),
                           dilation=dilation, groups=conv_groups(source.shape[1], weight))
            out = out.permute(0, 2, 3, 1).reshape(rows, -1)
        if is_last:
            return out.add_(residual_base)
        if convs[index + 1][0].shape[-1] == 1:  # read as rows: no zero row needed
            hidden = out.clamp_(0, clamp)
        else:
            compact = out.new_empty(1 + rows, out.shape[1])
            compact[0].zero_()
            hidden = torch.clamp(out, 0, clamp, out=compact[1:])
    raise AssertionError('a block has at least one convolution')


def add_relu_(x: Tensor, bias: Tensor) -> Tensor:
    """``x = ReLU(x + bias)`` in place, in one pass where ATen has the fused kernel.

    ``aten::_add_relu_`` (the kernel behind TorchScript's add-ReLU fusion)
    exists for float32/float64 CPU tensors only; elsewhere two passes.
    """
    if x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64):
        return torch.ops.aten._add_relu_(x, bias)
    return x.add_(bias).relu_()


def sparse_block_forward(convs: Sequence[Tuple[Tensor, Tensor]],
                         shortcut: Optional[Tuple[Tensor, Tensor]], last_relu: bool,
                         x_flat: Tensor, patches: BlockPatches, layout: PatchLayout,
                         groups: int, dilation: int) -> Tensor:
    """One refine block on a flat ``(B*H*W + 2, C)`` buffer; returns the same layout.

    Args:
        convs: ``(weight, bias)`` of each BN-folded convolution, weights
            ``(C_out, C_in/G, k, k)`` (channels-last for ``k > 1``).
        shortcut: BN-folded 1x1 shortcut ``(weight, bias)``, None for the identity.
        last_relu (bool): Whether the block ends with a ReLU.
        x_flat (Tensor): The block input as flat rows.
        patches (BlockPatches): The block's selected patches (:func:`select_patches`).
        layout (PatchLayout): The stage's patch layout.
        groups (int): ``G``.
        dilation (int): Dilation ``d`` of the 3x3 convolutions.

    With an identity shortcut the block updates ``x_flat`` in place (after
    every group has read it), which saves a full-size buffer per block.
    """
    num_rows = x_flat.shape[0] - 2
    dtype = x_flat.dtype
    last_bias = _cast(convs[-1][1], dtype)
    # The shortcut is the identity, updated in place once all groups have read
    # their input, or a folded 1x1 conv whose bias carries the last norm's
    # shift b_last; the conv runs over all rows, the zero and sink rows too,
    # so that its result is the next buffer as it is (zero row reset below).
    identity = shortcut is None
    out = x_flat if identity else conv1x1_rows(x_flat, shortcut[0],
                                               _cast(shortcut[1], dtype) + last_bias)
    if patches.slots:
        out_rows = _group_rows(out, groups)
        base = out_rows.index_select(0, patches.write_core).view(-1, out.shape[1])
        updated = residual_function(convs, x_flat, patches, layout, groups, dilation, base)
        # Own pixels are written once each (padding all goes to the sink row),
        # so gather-add-copy is exact and avoids the atomic adds of an
        # accumulating scatter, which contend badly across threads.
        out_rows.index_copy_(0, patches.write_core,
                             _cast(updated, dtype).view(-1, out_rows.shape[1]))
    # One pass over the map: b_last for the identity shortcut (every pixel,
    # the refined ones too: their last conv ran without bias), then the ReLU.
    pixels = out[:num_rows]
    if identity and last_relu:
        add_relu_(pixels, last_bias)
    elif identity:
        pixels += last_bias
    elif last_relu:
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


class StageWeights(NamedTuple):
    """The folded weights of a stage's refine blocks, as the refine op takes them.

    ``weights``/``biases`` list, block by block, the ``convs_per_block``
    convolutions and then the 1x1 shortcut of the blocks with ``shortcuts[i]``.
    """
    weights: List[Tensor]
    biases: List[Tensor]
    convs_per_block: int
    shortcuts: List[int]
    last_relus: List[int]


def split_blocks(weights: Sequence[Tensor], biases: Sequence[Tensor], convs_per_block: int,
                 shortcuts: Sequence[int]
                 ) -> List[Tuple[List[Tuple[Tensor, Tensor]], Optional[Tuple[Tensor, Tensor]]]]:
    """Per block, its ``(weight, bias)`` convolutions and its shortcut (None: identity)."""
    pairs = list(zip(weights, biases))
    blocks, start = [], 0
    for has_shortcut in shortcuts:
        convs = pairs[start:start + convs_per_block]
        start += convs_per_block
        shortcut = None
        if has_shortcut:
            shortcut = pairs[start]
            start += 1
        blocks.append((convs, shortcut))
    if start != len(pairs) or not blocks:
        raise ValueError(f'refine_stage: {len(pairs)} weights do not fit {len(shortcuts)} blocks '
                         f'of {convs_per_block} convolutions with shortcuts {list(shortcuts)}')
    return blocks


def output_channels(weights: Sequence[Tensor], shortcuts: Sequence[int]) -> int:
    """Output width of a chain of refine blocks: that of the last block's last convolution."""
    return weights[len(weights) - 1 - int(shortcuts[-1])].shape[0]


def refine_stage(x: Tensor, masks: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                 convs_per_block: int, shortcuts: Sequence[int], last_relus: Sequence[int],
                 dilation: int) -> Tensor:
    """Run a chain of refine blocks sparsely; returns ``(B, C, H, W)`` (channels-last memory).

    The blocks of a stage share the patch layout (same map, grid, groups and
    dilation), so their patch indices are computed in one pass.

    Args:
        x (Tensor): Stage input ``(B, C_in, H, W)``.
        masks (Tensor): ``(N, B, G, Kh, Kw)`` patch masks of the ``N`` blocks
            (nonzero = refine).
        weights, biases, convs_per_block, shortcuts, last_relus: The folded
            blocks (:class:`StageWeights`).
        dilation (int): Dilation ``d`` of the 3x3 convolutions.
    """
    batch, _, height, width = x.shape
    groups = masks.shape[2]
    blocks = split_blocks(weights, biases, convs_per_block, shortcuts)
    if len(blocks) != masks.shape[0] or len(last_relus) != len(blocks):
        raise ValueError(f'refine_stage: {masks.shape[0]} masks, {len(blocks)} blocks and '
                         f'{len(last_relus)} last_relu flags must agree')
    layout = patch_layout(height, width, tuple(masks.shape[-2:]), dilation, x.device)
    patches = select_patches(masks.flatten(3) != 0, layout, height * width,
                             need_x_window=blocks[0][0][0][0].shape[-1] > 1)
    x_flat = to_flat(x)
    for (convs, shortcut), last_relu, block_patches in zip(blocks, last_relus, patches):
        x_flat = sparse_block_forward(convs, shortcut, bool(last_relu), x_flat, block_patches,
                                      layout, groups, dilation)
    channels = x_flat.shape[1]  # explicit: -1 cannot be inferred for an empty batch
    return x_flat[:batch * height * width].view(batch, height, width, channels).permute(0, 3, 1, 2)
