"""Patch masks and nearest-neighbour resampling shared by the dense and sparse paths.

Both inference paths must agree bit for bit on which pixel belongs to which
patch, so the pixel -> patch assignment is defined once here, in integer
arithmetic: pixel ``y`` of an ``H``-pixel axis split into ``K`` patches belongs
to patch ``(y * K) // H``. This is nearest-neighbour upsampling of the ``K x K``
mask to ``H x W`` and is exact for sizes that ``K`` does not divide, where
float-scale interpolation could round differently.
"""
import math
from typing import Sequence, Tuple

import torch
from torch import Tensor


def nearest_source_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """Index of the source cell each of ``out_size`` output cells copies from."""
    return torch.arange(out_size, device=device) * in_size // out_size


def grid_for_feature(height: int, width: int, patch_grid: int | None,
                     patch_size: int | None) -> Tuple[int, int]:
    """Patch grid ``(Kh, Kw)`` of a feature map.

    ``patch_grid=K`` gives ``K x K`` patches whatever the input size (the
    paper's setting); ``patch_size=p`` gives ``ceil(H/p) x ceil(W/p)`` patches
    of about ``p x p`` pixels (for detection-size inputs).
    """
    if patch_grid is not None:
        return patch_grid, patch_grid
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def expand_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-upsample a patch mask ``(B, G, Kh, Kw)`` to pixels ``(B, G, H, W)``.

    Differentiable in ``mask`` so that the straight-through gradient of the
    Gumbel-softmax reaches the region selectors.
    """
    rows = nearest_source_index(size[0], mask.shape[-2], mask.device)
    cols = nearest_source_index(size[1], mask.shape[-1], mask.device)
    return mask.index_select(-2, rows).index_select(-1, cols)


def apply_group_mask(x: Tensor, pixel_mask: Tensor) -> Tensor:
    """Zero the unselected pixels of each channel group.

    Args:
        x (Tensor): Features ``(B, C, H, W)``; group ``g`` owns channels
            ``[g*C/G, (g+1)*C/G)``.
        pixel_mask (Tensor): ``(B, G, H, W)`` mask of group ``g``.
    """
    b, c, h, w = x.shape
    groups = pixel_mask.shape[1]
    masked = x.view(b, groups, c // groups, h, w) * pixel_mask.unsqueeze(2).to(x.dtype)
    return masked.view(b, c, h, w)


def nearest_upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour upsampling to an exact ``size`` (odd sizes included)."""
    h, w = x.shape[-2:]
    out_h, out_w = size
    if out_h % h == 0 and out_w % w == 0:
        # Integer factors: broadcast instead of gathering, one copy in total.
        rh, rw = out_h // h, out_w // w
        b, c = x.shape[:2]
        return x[:, :, :, None, :, None].expand(b, c, h, rh, w, rw).reshape(b, c, out_h, out_w)
    rows = nearest_source_index(out_h, h, x.device)
    cols = nearest_source_index(out_w, w, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for an NHWC-strided 4-D tensor, else ``torch.contiguous_format``."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def fuse_upsampled(low: Tensor, high: Tensor, low_weight: Tensor, in_place: bool = False) -> Tensor:
    """``ReLU(a * up(low) + (1 - a) * high)`` without materialising ``up(low)``.

    The result has the memory format of ``low``, i.e. of the stage input:
    the sparse refine path produces ``high`` channels-last, and a backbone
    that returned NHWC maps for NCHW images would break consumers that read
    raw memory (mmcv's CPU RoIAlign does) and mix layouts in later convs.

    Args:
        low (Tensor): Base-branch features ``(B, C, h, w)``.
        high (Tensor): Refine-branch features ``(B, C, H, W)``.
        low_weight (Tensor): Channel weights ``a`` of shape ``(B, C, 1, 1)``.
        in_place (bool): Overwrite ``high`` when it already has the output's
            memory format (inference, when it is a scratch buffer).

    Returns:
        Tensor: ``(B, C, H, W)`` in the memory format of ``low``.
    """
    b, c, h, w = low.shape
    out_h, out_w = high.shape[-2:]
    memory_format = memory_format_of(low)
    weighted_low = low * low_weight
    high_weight = 1 - low_weight
    integer_factors = out_h % h == 0 and out_w % w == 0
    if integer_factors:
        # Index each output pixel as (low pixel, offset) and let the weighted
        # low-resolution map broadcast over the offsets: one pass, no up(low).
        # These (B, h, rh, w, rw, C) views exist for any strides, so one
        # expression serves NCHW and NHWC operands alike.
        rh, rw = out_h // h, out_w // w

        def blocks(x: Tensor, rows: int, cols: int) -> Tensor:
            return x.permute(0, 2, 3, 1).unflatten(1, (h, rows)).unflatten(3, (w, cols))

        operands = (blocks(weighted_low, 1, 1), blocks(high, rh, rw),
                    high_weight.view(b, 1, 1, 1, 1, c))
    else:
        operands = (nearest_upsample(weighted_low, (out_h, out_w)), high, high_weight)

    if torch.is_grad_enabled() and (low.requires_grad or high.requires_grad
                                    or low_weight.requires_grad):
        # Training (autograd has no out= variants); both branches share the
        # input's layout there.
        fused = torch.addcmul(*operands).relu_()
        if integer_factors:
            fused = fused.flatten(3, 4).flatten(1, 2).permute(0, 3, 1, 2)
        return fused.contiguous(memory_format=memory_format)
    if in_place and memory_format_of(high) == memory_format:
        out = high  # large fresh buffers cost page faults
    else:
        out = torch.empty_like(high, memory_format=memory_format)
    # Writing through a view of `out` converts the layout within the same pass.
    torch.addcmul(*operands, out=blocks(out, rh, rw) if integer_factors else out)
    return out.relu_()
