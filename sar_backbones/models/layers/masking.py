"""Patch masks and nearest-neighbour resampling shared by the dense and sparse paths.

Both inference paths must agree bit for bit on which pixel belongs to which
patch, so the pixel -> patch assignment is defined once here, in integer
arithmetic: pixel ``y`` of an ``H``-pixel axis split into ``K`` patches belongs
to patch ``(y * K) // H``. This is nearest-neighbour upsampling of the ``K x K``
mask to ``H x W`` and is exact for sizes that ``K`` does not divide, where
float-scale interpolation could round differently.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from sar_backbones.inference.memory_format import memory_format_of, rows_to_nchw


def nearest_source_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """Index of the source cell each of ``out_size`` output cells copies from."""
    return torch.arange(out_size, device=device) * in_size // out_size


def grid_for_feature(height: int, width: int, patch_grid: int | None,
                     patch_size: int | None) -> Tuple[int, int]:
    """Patch grid ``(Kh, Kw)`` of a feature map.

    ``patch_grid=K`` gives ``K x K`` patches whatever the input size (the
    paper's setting); ``patch_size=p`` gives ``ceil(H/p) x ceil(W/p)`` patches
    of about ``p x p`` pixels (for detection-size inputs).

    Raises:
        ValueError: The map is smaller than the grid (a patch would be empty).
    """
    if patch_grid is not None:
        grid = patch_grid, patch_grid
    else:
        grid = math.ceil(height / patch_size), math.ceil(width / patch_size)
    if grid[0] > height or grid[1] > width:
        raise ValueError(
            f'input too small: a {height}x{width} feature map cannot be split into the '
            f'{grid[0]}x{grid[1]} patch grid (patch_grid={patch_grid}); feed a larger '
            'image or use patch_size=... for a grid that follows the input size')
    return grid


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


def fuse_upsampled(low: Tensor, high: Tensor, low_weight: Tensor, in_place: bool = False) -> Tensor:
    """``ReLU(a * up(low) + (1 - a) * high)`` without materialising ``up(low)``.

    The result has the memory format of ``low``, i.e. of the stage input: the
    sparse refine path produces ``high`` channels-last, and a backbone that
    returned NHWC maps for NCHW images would break consumers that read raw
    memory (mmcv's CPU RoIAlign does).

    Args:
        low (Tensor): Base-branch features ``(B, C, h, w)``.
        high (Tensor): Refine-branch features ``(B, C, H, W)``.
        low_weight (Tensor): Channel weights ``a`` of shape ``(B, C, 1, 1)``.
        in_place (bool): Overwrite ``high`` (inference, when it is a scratch buffer).

    Returns:
        Tensor: ``(B, C, H, W)`` in the memory format of ``low``.
    """
    b, c, h, w = low.shape
    out_h, out_w = high.shape[-2:]
    out_format = memory_format_of(low)
    weighted_low = low * low_weight
    high_weight = 1 - low_weight
    if out_h % h or out_w % w:
        fused = torch.addcmul(nearest_upsample(weighted_low, (out_h, out_w)), high, high_weight)
        return fused.relu_().contiguous(memory_format=out_format)

    rh, rw = out_h // h, out_w // w
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (low, high, low_weight))
    out = high if in_place and not needs_grad else None
    if memory_format_of(high) == torch.channels_last:
        # Channels innermost: index each output pixel as (low pixel, offset)
        # and broadcast the weighted low map over the offsets, in one pass.
        def blocks(x: Tensor, rows: int, cols: int) -> Tensor:  # (B, h, rows, w, cols, C)
            return x.permute(0, 2, 3, 1).unflatten(1, (h, rows)).unflatten(3, (w, cols))

        fused = _addcmul(blocks(weighted_low.contiguous(memory_format=torch.channels_last), 1, 1),
                         blocks(high, rh, rw), high_weight.view(b, 1, 1, 1, 1, c),
                         None if out is None else blocks(out, rh, rw))
        fused = fused.flatten(3, 4).flatten(1, 2).permute(0, 3, 1, 2)
        return fused if out_format == torch.channels_last else rows_to_nchw(fused)
    # NCHW: a 2-element innermost loop (the column offsets) would be slow, so
    # widen the low map to full width first and broadcast it over the row
    # offsets only (half the size of up(low)).
    wide_low = weighted_low.unsqueeze(-1).expand(b, c, h, w, rw).reshape(b, c, h, 1, out_w)
    out = out if out is not None and out.is_contiguous() else None
    fused = _addcmul(wide_low, high.reshape(b, c, h, rh, out_w), high_weight.view(b, c, 1, 1, 1),
                     None if out is None else out.view(b, c, h, rh, out_w))
    return fused.reshape(b, c, out_h, out_w).contiguous(memory_format=out_format)


def _addcmul(base: Tensor, tensor: Tensor, scale: Tensor, out: Optional[Tensor]) -> Tensor:
    """``ReLU(base + tensor * scale)``, into ``out`` when given (inference)."""
    if out is None:
        return torch.addcmul(base, tensor, scale).relu_()
    return torch.addcmul(base, tensor, scale, out=out).relu_()
