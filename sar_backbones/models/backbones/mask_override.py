"""Random patch masks at an exact activation rate, for latency sweeps and analysis.

The masks are drawn from a counter-based integer hash of ``(seed, block,
image, group, patch)`` instead of a ``torch.Generator``: a pure tensor
function, so that the same masks come out on every device, and
``torch.compile`` traces it without a graph break.
"""
import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply rounds) on int64 tensors < 2**32.

    Products stay below 2**59, so int64 arithmetic never overflows.
    """
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def random_patch_masks(shape: torch.Size, rate: float, seed: int, block: int,
                       device: torch.device, dtype: torch.dtype) -> Tensor:
    """Masks ``(B, G, Kh, Kw)`` with exactly ``round(rate * Kh * Kw)`` patches per image and group.

    Args:
        shape: ``(B, G, Kh, Kw)``.
        rate: Fraction of patches to select, in [0, 1].
        seed: Chooses the masks; with ``block`` it seeds the hash.
        block: Index of the masked block (blocks get different masks).
        device: Where the masks are made.
        dtype: Their dtype (0/1 values).
    """
    batch, groups, kh, kw = shape
    patches = kh * kw
    keep = round(rate * patches)
    stream = _mix32(torch.tensor((seed * 1000 + block) & _MASK32, device=device))
    counter = torch.arange(batch * groups * patches, device=device, dtype=torch.int64)
    scores = _mix32(counter ^ stream).view(batch, groups, patches)
    chosen = scores.argsort(dim=-1)[..., :keep]
    masks = torch.zeros(batch, groups, patches, device=device, dtype=dtype)
    return masks.scatter_(-1, chosen, 1.0).view(batch, groups, kh, kw)
