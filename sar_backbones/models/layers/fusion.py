"""Adaptive feature fusion (paper Eq. 5)."""
import torch.nn as nn
from torch import Tensor

from .masking import fuse_upsampled


class FusionGate(nn.Module):
    """Channel weights ``a = Sigmoid(FC(ReLU(FC(GAP(x_base)))))`` of the fusion.

    The fusion computes ``y = a*up(x_base) + (1-a)*x_refine``.

    Args:
        channels (int): Channels ``C`` of both branches after alignment.
        reduction (int): Hidden-layer reduction of the two FC layers. Defaults to 16.

    Example:
        >>> gate = FusionGate(256)
        >>> y = gate(torch.rand(2, 256, 28, 28), torch.rand(2, 256, 56, 56))
        >>> y.shape
        torch.Size([2, 256, 56, 56])
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.relu = nn.ReLU(inplace=True)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.01)  # starts as an even 0.5/0.5 blend

    def weights(self, x_base: Tensor) -> Tensor:
        b, c = x_base.shape[:2]
        pooled = self.pool(x_base).view(b, c)
        return self.fc2(self.relu(self.fc1(pooled))).sigmoid().view(b, c, 1, 1)

    def forward(self, x_base: Tensor, x_refine: Tensor, in_place: bool = False) -> Tensor:
        """Fuse the low-resolution base features into the refine resolution.

        ``in_place=True`` reuses ``x_refine``'s memory (inference only).
        """
        return fuse_upsampled(x_base, x_refine, self.weights(x_base), in_place=in_place)
