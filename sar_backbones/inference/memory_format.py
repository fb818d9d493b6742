"""Memory-format helpers: which layout a map has, and fast NCHW <-> NHWC copies.

PyTorch copies a layout change in one of two ways: a 2-D transpose
(``(C, H*W)`` -> ``(H*W, C)`` or back, image by image) takes its
cache-blocked kernel, which runs on one thread; a 4-D permutation takes the
generic strided copy, which runs on all intra-op threads.
``benchmarks/layout_copy.py`` measures both on the sparse path's maps: NHWC
-> NCHW is 2-10x faster blocked on one or two threads (2-core AMD EPYC) but
2.5-10x slower than the strided copy on 16 threads (16-core Xeon); NCHW ->
NHWC is as fast or faster strided on every thread count measured.
"""
import torch
from torch import Tensor

# Up to this intra-op thread count the serial blocked transpose is the faster
# NHWC -> NCHW copy on the CPU.
BLOCKED_TO_NCHW_MAX_THREADS = 2


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for an NHWC-strided 4-D tensor, else ``torch.contiguous_format``."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def copy_to_rows_(rows: Tensor, x: Tensor) -> Tensor:
    """Write ``x`` ``(B, C, H, W)`` into ``rows`` ``(B*H*W, C)`` (pixel-major, channels-last)."""
    batch, channels, height, width = x.shape
    rows.view(batch, height, width, channels).copy_(x.permute(0, 2, 3, 1))
    return rows


def nchw_copy_blocked(x: Tensor) -> Tensor:
    """:func:`rows_to_nchw` as 2-D transposes, image by image."""
    batch, channels, height, width = x.shape
    out = x.new_empty(x.shape)
    for image in range(batch):
        pixels = x[image].permute(1, 2, 0).reshape(height * width, channels)
        out[image].view(channels, height * width).copy_(pixels.t())
    return out


def blocked_nchw_copy(device: torch.device) -> bool:
    """Whether :func:`rows_to_nchw` takes the blocked transpose at the current thread count."""
    return device.type == 'cpu' and torch.get_num_threads() <= BLOCKED_TO_NCHW_MAX_THREADS


def rows_to_nchw(x: Tensor) -> Tensor:
    """A contiguous (NCHW) copy of an NHWC-strided ``(B, C, H, W)`` tensor (differentiable).

    Under ``torch.compile`` the compiler generates the copy itself.
    """
    if torch.compiler.is_compiling() or not blocked_nchw_copy(x.device):
        return x.contiguous()
    return nchw_copy_blocked(x)
