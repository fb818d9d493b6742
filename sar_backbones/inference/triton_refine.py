"""The sparse refine op on CUDA: Triton kernels over fixed-capacity patch lists, no host sync.

The same contract as :func:`sar_backbones.inference.sparse.refine_stage`
(and the C++ kernel of :mod:`.native`), built for GPUs and CUDA graphs:

* **indices on the device, fixed capacity.** For every block and mask group
  ``g`` the patches are sorted selected-first (a stable sort of the mask, so
  in key order), their number ``count[g]`` stays in device memory, and every
  index table has the capacity of all ``B*Kh*Kw`` patches. Nothing is read
  back to the host (no ``nonzero``, ``.item()`` or ``.tolist()``), so the
  shapes of a forward do not depend on the masks and a CUDA graph can
  capture it;
* **one kernel per convolution, early exit.** A convolution is a GEMM whose
  A rows are read through a row table (``-1`` reads zeros: a pixel outside
  the map or in an unselected patch, the masking of the dense path). Its grid
  covers the capacity; a program whose tile starts at or after
  ``count[g] * PH * PW`` returns at once, so the cost follows the mask;
* **fused epilogues.** Bias + ReLU in the inner convolutions; in the last
  one the pre-activation shortcut ``shortcut(x) + b_last`` is added, the
  block's ReLU applied and the rows scattered to their pixels. The dense part
  of a block (every pixel: ``act(shortcut(x) + b_last)``) is one elementwise
  pass or one matrix product before it;
* intermediate activations live in compact rows ``slot * PH*PW + local`` of
  the selected patches; a 3x3 convolution reads its taps there (neighbouring
  patches of the same group included) through a ``(rows, 9)`` table.

The weights are laid out per call (``(conv groups, taps, C_in/groups,
C_out/groups)``: one small copy on the device; a CUDA graph keeps it).
On the CPU the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1``), which the tests use to check them against the
PyTorch implementation without a GPU.
"""
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sparse import PatchLayout, patch_layout, split_blocks

try:  # Triton ships with the CUDA builds of PyTorch on Linux; absent elsewhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the PyTorch build
    triton = None

__all__ = ['available', 'refine_stage', 'unavailable_reason']


def interpreted() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(x: Tensor) -> Optional[str]:
    """Why the kernels cannot run on ``x`` (None when they can)."""
    if triton is None:
        return "the triton package is missing (it ships with PyTorch's CUDA builds on Linux)"
    if not (x.is_cuda or interpreted()):
        return 'they need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)'
    if x.dtype not in DTYPES:
        return f'they take {", ".join(str(d) for d in DTYPES)}'
    return None


def available(x: Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``: CUDA, or any device under the interpreter."""
    return unavailable_reason(x) is None


if triton is not None:

    @triton.jit
    def _indirect_conv_kernel(a_ptr, lda, in_rows_ptr, w_ptr, bias_ptr, out_ptr, ldo,
                              out_rows_ptr, res_ptr, count_ptr, rows_per_slot, capacity_rows,
                              k_group, n_group, groups_per_mask, TAPS: tl.constexpr,
                              HAS_BIAS: tl.constexpr, OUT_COMPACT: tl.constexpr,
                              HAS_RES: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """``out[row] = act(sum_t A[in_row(t)] @ W[t] (+ bias) (+ res[row]))`` for one tile.

        Grid: (capacity_rows / BM, conv groups, n_group / BN). Conv group
        ``cg`` belongs to mask group ``cg // groups_per_mask``, reads A columns
        ``cg * k_group ...`` and writes columns ``cg * n_group ...``.
        """
        pid_m, conv_group, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        mask_group = conv_group // groups_per_mask
        active = tl.load(count_ptr + mask_group) * rows_per_slot
        if pid_m * BM >= active:  # the tile lies beyond the selected patches
            return
        rows = pid_m * BM + tl.arange(0, BM)
        row_ok = rows < active
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < n_group
        ks = tl.arange(0, BK)
        table = mask_group * capacity_rows + rows
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for tap in range(TAPS):
            src = tl.load(in_rows_ptr + table * TAPS + tap, mask=row_ok, other=-1)
            src_ok = src >= 0
            a_base = a_ptr + src.to(tl.int64)[:, None] * lda + conv_group * k_group
            w_base = w_ptr + ((conv_group * TAPS + tap) * k_group) * n_group
            for k0 in range(0, k_group, BK):
                k_ok = (k0 + ks) < k_group
                a = tl.load(a_base + (k0 + ks)[None, :], mask=src_ok[:, None] & k_ok[None, :],
                            other=0.)
                w = tl.load(w_base + (k0 + ks)[:, None] * n_group + cols[None, :],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.)
                if IEEE:  # float32 stays float32 (no TF32): exact against the dense path
                    acc = tl.dot(a, w, acc, input_precision='ieee')
                else:
                    acc = tl.dot(a, w.to(a.dtype), acc)
        out_cols = conv_group * n_group + cols
        if HAS_BIAS:
            acc += tl.load(bias_ptr + out_cols, mask=col_ok, other=0.).to(tl.float32)[None, :]
        if OUT_COMPACT:
            dst = rows.to(tl.int64)
            dst_ok = row_ok
        else:
            dst = tl.load(out_rows_ptr + table, mask=row_ok, other=-1).to(tl.int64)
            dst_ok = row_ok & (dst >= 0)
        keep = dst_ok[:, None] & col_ok[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + dst[:, None] * ldo + out_cols[None, :], mask=keep,
                           other=0.).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.)
        tl.store(out_ptr + dst[:, None] * ldo + out_cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=keep)


def _block_size(width: int, largest: int) -> int:
    """A power of two in [16, largest] covering ``width`` (tl.dot needs >= 16)."""
    return max(16, min(largest, triton.next_power_of_2(max(int(width), 1))))


class _Tables:
    """Row tables of one block, every mask group at full capacity (``cap = B*Kh*Kw`` slots).

    ``pixel``: ``(G, cap*PP)`` flat pixel row of each compact row (-1:
    padding of a smaller patch); ``count``: ``(G,)`` int32 selected patches.
    """

    def __init__(self, selected: Tensor, layout: PatchLayout, pixels_per_image: int,
                 dilation: int):
        batch, groups, patches = selected.shape
        self.patches_per_image, self.pixels_per_image = patches, pixels_per_image
        keys = selected.permute(1, 0, 2).reshape(groups, batch * patches)  # (G, cap)
        self.selected = keys
        # Selected first, in key order: a stable sort of "not selected".
        self.order = torch.sort((~keys).to(torch.uint8), dim=1, stable=True).indices
        self.count = keys.sum(1, dtype=torch.int32)
        rank = keys.to(torch.int32).cumsum(1, dtype=torch.int32) - 1
        self.rank = torch.where(keys, rank, -1)
        self.image = torch.div(self.order, patches, rounding_mode='floor')
        self.patch = self.order.remainder(patches)
        core = layout.core[self.patch]  # (G, cap, PP)
        self.rows_per_slot = core.shape[-1]
        base = (self.image * pixels_per_image)[..., None]
        self.pixel = torch.where(core >= 0, core + base, -1).flatten(1).to(torch.int32)
        self.core_ok = core >= 0
        self.layout, self.dilation = layout, dilation

    def taps(self, compact: bool) -> Tensor:
        """``(G, cap*PP, 9)`` rows of a 3x3 convolution's taps, -1 where the dense path reads 0.

        ``compact``: rows of the compact buffer (``rank * PP + local``) of the
        previous convolution; else pixel rows of the block input.
        """
        layout, d = self.layout, self.dilation
        patch_h, patch_w = layout.patch_shape
        window_w = layout.window_shape[1]
        dev = self.pixel.device
        local_y = torch.arange(patch_h, device=dev).repeat_interleave(patch_w)
        local_x = torch.arange(patch_w, device=dev).repeat(patch_h)
        offsets = torch.arange(3, device=dev) * d
        # Window position of tap (ky, kx) of core pixel (py, px): (py + ky d, px + kx d).
        tap = ((local_y[:, None, None] + offsets[None, :, None]) * window_w +
               (local_x[:, None, None] + offsets[None, None, :])).flatten(1)  # (PP, 9)
        window = layout.window[self.patch][..., tap]  # (G, cap, PP, 9)
        owner = layout.window_patch[self.patch][..., tap]
        owner_key = owner + (self.image * self.patches_per_image)[..., None, None]
        flat_key = owner_key.flatten(1)
        owner_selected = self.selected.gather(1, flat_key).view_as(owner)
        valid = (window >= 0) & owner_selected & self.core_ok[..., None]
        if compact:
            local = layout.window_local[self.patch][..., tap]
            owner_rank = self.rank.gather(1, flat_key).view_as(owner)
            rows = owner_rank * self.rows_per_slot + local
        else:
            rows = window + (self.image * self.pixels_per_image)[..., None, None]
        return torch.where(valid, rows, -1).flatten(1, 2).to(torch.int32)


def _conv(a: Tensor, in_rows: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor,
          out_rows: Optional[Tensor], residual: Optional[Tensor], tables: _Tables, mask_groups: int,
          relu: bool) -> None:
    """One convolution of a block on the selected rows (:func:`_indirect_conv_kernel`).

    ``a``/``out``: row buffers ``(rows, C)``; ``in_rows``: ``(G, cap*PP, taps)``;
    ``out_rows``: ``(G, cap*PP)`` pixel rows to scatter to, None for the compact rows.
    """
    out_channels, k_group, size = weight.shape[0], weight.shape[1], weight.shape[-1]
    conv_groups = a.shape[1] // k_group
    n_group = out_channels // conv_groups
    # (conv group, tap, C_in/groups, C_out/groups): a tile of W is a plain 2-D block.
    packed = weight.to(a.dtype).reshape(conv_groups, n_group, k_group, size * size) \
        .permute(0, 3, 2, 1).contiguous()
    capacity_rows = in_rows.shape[1]
    block_m = 16 if interpreted() else 64
    block_n, block_k = _block_size(n_group, 64), _block_size(k_group, 32)
    grid = (triton.cdiv(capacity_rows, block_m), conv_groups, triton.cdiv(n_group, block_n))
    if capacity_rows == 0:
        return
    _indirect_conv_kernel[grid](
        a, a.stride(0), in_rows, packed, bias if bias is not None else packed, out, out.stride(0),
        out_rows if out_rows is not None else in_rows, residual if residual is not None else out,
        tables.count, tables.rows_per_slot, capacity_rows, k_group, n_group,
        conv_groups // mask_groups, TAPS=size * size, HAS_BIAS=bias is not None,
        OUT_COMPACT=out_rows is None, HAS_RES=residual is not None, RELU=relu,
        IEEE=a.dtype == torch.float32, BM=block_m, BN=block_n, BK=block_k)


def _block(x: Tensor, convs: Sequence[Tuple[Tensor, Tensor]],
           shortcut: Optional[Tuple[Tensor, Tensor]], last_relu: bool, tables: _Tables,
           mask_groups: int) -> Tensor:
    """One refine block on pixel rows ``x`` ``(B*H*W, C_in)``; returns ``(B*H*W, C_out)``."""
    dtype = x.dtype
    last_bias = convs[-1][1].to(dtype)
    # The dense part: every pixel gets the pre-activation shortcut + b_last ...
    if shortcut is None:
        pre = x + last_bias
    else:
        weight, bias = shortcut
        pre = torch.addmm((bias.to(dtype) + last_bias), x, weight.to(dtype).flatten(1).t())
    out = pre.relu() if last_relu else pre.clone()
    # ... and the selected pixels the residual function on top of it.
    capacity_rows = tables.pixel.shape[1]
    source = x  # the block input (pixel rows), then the compact rows of each convolution
    for index, (weight, bias) in enumerate(convs):
        is_last = index == len(convs) - 1
        if weight.shape[-1] == 3:
            in_rows = tables.taps(compact=index > 0)
        elif index == 0:
            in_rows = tables.pixel[..., None]
        else:  # a 1x1 convolution on the previous compact rows: row r reads row r
            in_rows = torch.arange(capacity_rows, device=x.device, dtype=torch.int32) \
                .expand(mask_groups, capacity_rows)[..., None]
        if is_last:
            _conv(source, in_rows.contiguous(), weight, None, out, tables.pixel, pre, tables,
                  mask_groups, last_relu)
            return out
        hidden = x.new_empty(max(capacity_rows, 1), weight.shape[0])
        _conv(source, in_rows.contiguous(), weight, bias.to(dtype), hidden, None, None, tables,
              mask_groups, True)
        source = hidden
    raise AssertionError('a block has at least one convolution')


def refine_stage(x: Tensor, masks: Tensor, weights: List[Tensor], biases: List[Tensor],
                 convs_per_block: int, shortcuts: List[int], last_relus: List[int],
                 dilation: int) -> Tensor:
    """:func:`sar_backbones.inference.sparse.refine_stage` with the Triton kernels.

    Same arguments and result (``(B, C, H, W)``, channels-last memory). Reads
    nothing back to the host.
    """
    reason = unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f'the Triton refine kernels cannot run: {reason}')
    batch, channels, height, width = x.shape
    blocks = split_blocks(weights, biases, convs_per_block, shortcuts)
    if len(blocks) != masks.shape[0] or len(last_relus) != len(blocks):
        raise ValueError(f'refine_stage: {masks.shape[0]} masks, {len(blocks)} blocks and '
                         f'{len(last_relus)} last_relu flags must agree')
    mask_groups = masks.shape[2]
    layout = patch_layout(height, width, tuple(masks.shape[-2:]), dilation, x.device)
    selected = masks.flatten(3) != 0  # (N, B, G, Kh*Kw)
    rows = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    for (convs, shortcut), last_relu, block_selected in zip(blocks, last_relus, selected):
        tables = _Tables(block_selected, layout, height * width, dilation)
        rows = _block(rows.contiguous(), convs, shortcut, bool(last_relu), tables, mask_groups)
    return rows.view(batch, height, width, rows.shape[1]).permute(0, 3, 1, 2)
