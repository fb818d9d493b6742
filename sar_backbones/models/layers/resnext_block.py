"""The ResNeXt bottleneck of SAR-ResNeXt: 1x1 -> grouped 3x3 (cardinality) -> 1x1.

One class serves every branch, as :class:`Bottleneck` does for SAR-ResNet:
with ``groups=G`` (the refine branch) the two 1x1 convolutions are split into
the ``G`` mask groups and the 3x3 convolution into ``cardinality`` groups, a
multiple of ``G``, so that mask group ``g`` owns the contiguous block of
cardinality groups ``[g * cardinality/G, (g+1) * cardinality/G)`` (as in the
authors' ``Bottleneck_refine`` of ``sar_resnext_1attFuse.py``). Everything
else (masking, BatchNorm folding, deploy, the sparse path) is the
:class:`ResidualBlock`'s.
"""
import math
from typing import Any, List, Optional

import torch.nn as nn

from .blocks import Bottleneck, ConvSpec


def resnext_width(out_channels: int, cardinality: int, base_width: int,
                  base_channels: int = 64) -> int:
    """Middle width of a ResNeXt bottleneck (mmdet's rule) for an output width ``C``.

    ``floor(planes * base_width / base_channels) * cardinality`` with
    ``planes = C / 4``; a cardinality of 1 keeps ResNet's ``planes``.
    """
    planes = out_channels // Bottleneck.expansion
    if cardinality == 1:
        return planes
    return math.floor(planes * base_width / base_channels) * cardinality


class ResNeXtBottleneck(Bottleneck):
    """ResNeXt bottleneck whose 3x3 convolution has ``cardinality`` groups.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels ``C`` (4 x planes).
        stride (int): Stride of the 3x3 convolution. Defaults to 1.
        dilation (int): Dilation of the 3x3 convolution. Defaults to 1.
        groups (int): Mask groups ``G`` of the 1x1 convolutions (1 outside
            the refine branch). Defaults to 1.
        last_relu (bool): Whether to apply the final ReLU. Defaults to True.
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config.
        cardinality (int): Groups of the 3x3 convolution, a multiple of
            ``groups``. Defaults to 32.
        base_width (int): Width per cardinality group at ``base_channels``
            (the ``4`` of ``32x4d``). Defaults to 4.
        base_channels (int): The backbone's ``base_channels`` (mmdet's rule
            scales the middle width by ``base_width / base_channels``).
            Defaults to 64.
        **kwargs: The other options of :class:`ResidualBlock` (``dcn``,
            ``plugins``, ``drop_path_rate``).
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, last_relu: bool = True,
                 conv_cfg: Optional[dict] = None, norm_cfg: dict = dict(type='BN'),
                 cardinality: int = 32, base_width: int = 4, base_channels: int = 64,
                 **kwargs: Any) -> None:
        if cardinality % groups:
            raise ValueError(f'cardinality {cardinality} must be a multiple of the mask groups '
                             f'G={groups}: each mask group owns whole cardinality groups')
        # Plain attributes, set before nn.Module.__init__ because conv_specs
        # (called by ResidualBlock.__init__) needs them.
        self.cardinality = cardinality
        self.base_width = base_width
        self.base_channels = base_channels
        super().__init__(in_channels, out_channels, stride=stride, dilation=dilation,
                         groups=groups, last_relu=last_relu, conv_cfg=conv_cfg,
                         norm_cfg=norm_cfg, **kwargs)

    def conv_specs(self, in_channels: int, out_channels: int, stride: int) -> List[ConvSpec]:
        mid = resnext_width(out_channels, self.cardinality, self.base_width, self.base_channels)
        if mid < 1:
            raise ValueError(f'a ResNeXt block of width {out_channels} has no middle channels '
                             f'(cardinality {self.cardinality}, base_width {self.base_width})')
        return [ConvSpec(in_channels, mid, 1), ConvSpec(mid, mid, 3, stride, self.cardinality),
                ConvSpec(mid, out_channels, 1)]

    def extra_repr(self) -> str:
        return f'cardinality={self.cardinality}, base_width={self.base_width}'


class ResNeXtBlockType:
    """:class:`ResNeXtBottleneck` with its cardinality and base width bound.

    Stands wherever SAR-ResNet takes a block class (``block(in, out, ...)``,
    ``block.expansion``): every block of a SAR-ResNeXt, base, refine,
    transition or stage 4, is built with the same ResNeXt settings.
    """

    expansion = ResNeXtBottleneck.expansion
    __name__ = 'ResNeXtBottleneck'

    def __init__(self, cardinality: int, base_width: int, base_channels: int = 64) -> None:
        self.cardinality = cardinality
        self.base_width = base_width
        self.base_channels = base_channels

    def mid_width(self, out_channels: int) -> int:
        """Middle (grouped 3x3) width of a block of output width ``C`` (:func:`resnext_width`).

        For checks of what ``norm_cfg`` normalises: a plain bottleneck's
        middle is ``C/4``, a ResNeXt one's follows the cardinality.
        """
        return resnext_width(out_channels, self.cardinality, self.base_width, self.base_channels)

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return ResNeXtBottleneck(*args, cardinality=self.cardinality, base_width=self.base_width,
                                 base_channels=self.base_channels, **kwargs)

    def __repr__(self) -> str:
        return (f'ResNeXtBlockType(cardinality={self.cardinality}, '
                f'base_width={self.base_width}, base_channels={self.base_channels})')
