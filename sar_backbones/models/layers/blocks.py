"""Residual blocks shared by every branch of SAR-ResNet.

One block class per ResNet block type serves the base branch, the refine
branch (grouped convolutions + patch masks), the stage transitions and the
plain last stage: only the arguments differ.
"""
import itertools
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .masking import apply_group_mask
from .pooling import DepthwiseAvgPool2d


def weights_key(module: nn.Module) -> Tuple[Tuple[int, int], ...]:
    """``(storage, version)`` of every parameter and buffer: changes with any weight.

    Runs on every sparse forward, so it walks ``_parameters``/``_buffers``
    directly (~5x cheaper than ``named_parameters()``). A replaced submodule or
    tensor changes the storage, an in-place update the version. Inference
    tensors (created under ``torch.inference_mode``) have no version counter;
    their storage alone is the key.
    """
    key = []
    pending = [module]
    while pending:
        current = pending.pop()
        for tensor in itertools.chain(current._parameters.values(), current._buffers.values()):
            if tensor is not None:
                key.append((tensor.data_ptr(), -1 if tensor.is_inference() else tensor._version))
        pending.extend(child for child in current._modules.values() if child is not None)
    return tuple(key)


class ConvSpec(NamedTuple):
    """One convolution of a block: channels, kernel size and stride."""
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1


class FoldedConv(NamedTuple):
    """A convolution with its BatchNorm folded in (inference only)."""
    weight: Tensor
    bias: Tensor
    kernel_size: int
    dilation: int


def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """Weight and bias of ``norm(conv(x))`` as a single convolution (eval mode).

    Accepts a BatchNorm-type norm or an ``nn.Identity`` (after
    ``mmcv.cnn.fuse_conv_bn`` has already folded it).
    """
    weight = conv.weight
    bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(norm, nn.Identity):
        return weight, bias
    if not isinstance(norm, _BatchNorm):
        raise TypeError(
            f'sparse inference folds BatchNorm into the convolutions, got {type(norm).__name__}; '
            "use inference_mode='dense' with other norm layers")
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    return weight * scale.view(-1, 1, 1, 1), (bias - norm.running_mean) * scale + norm.bias


def make_shortcut(in_channels: int, out_channels: int, stride: int,
                  conv_cfg: Optional[dict], norm_cfg: dict) -> Optional[nn.Sequential]:
    """ResNet-D shortcut: 3x3/2 average pooling, then 1x1 conv + norm if the width changes.

    The 3x3 window (rather than ResNet-D's 2x2) follows the authors' model.
    """
    if stride == 1 and in_channels == out_channels:
        return None
    # The pooling slot exists even at stride 1 so that the conv and norm keep
    # their state-dict keys (shortcut.1/.2) when a segmentation model replaces
    # a stride by a dilation: ImageNet weights then load unchanged.
    layers: List[nn.Module] = [
        DepthwiseAvgPool2d(3, stride=stride, padding=1) if stride != 1 else nn.Identity()]
    if in_channels != out_channels:
        layers.append(build_conv_layer(conv_cfg, in_channels, out_channels, 1, bias=False))
        layers.append(build_norm_layer(norm_cfg, out_channels)[1])
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Residual block ``y = ReLU(F(x) + shortcut(x))`` with optional patch masks.

    With ``groups=G`` every convolution of ``F`` is split into ``G`` channel
    groups (the sub-branches of the refine branch). Given a pixel mask, the
    input and each intermediate activation of group ``g`` are zeroed outside
    the regions selected for ``g`` (Eq. 3, as in the authors' model), while the
    shortcut takes the unmasked input and the last norm is not masked: at an
    unselected pixel the block outputs ``shortcut + BN shift``. The authors'
    BasicBlock let its last 3x3 conv reach one pixel past the selection; here
    every convolution stays inside it (a no-op for the Bottleneck, whose last
    conv is 1x1), so that the cost is exactly ``rate x dense``.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the block. Defaults to 1.
        dilation (int): Dilation of the 3x3 convolutions. Defaults to 1.
        groups (int): Channel groups ``G`` of every convolution. Defaults to 1.
        last_relu (bool): Whether to apply the final ReLU. Defaults to True.
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config.
    """

    expansion: int = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, last_relu: bool = True,
                 conv_cfg: Optional[dict] = None, norm_cfg: dict = dict(type='BN')) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.last_relu = last_relu
        self.specs = self.conv_specs(in_channels, out_channels, stride)
        for index, spec in enumerate(self.specs, start=1):
            padding = dilation * (spec.kernel_size // 2)
            conv = build_conv_layer(
                conv_cfg, spec.in_channels, spec.out_channels, spec.kernel_size,
                stride=spec.stride, padding=padding,
                dilation=dilation if spec.kernel_size > 1 else 1, groups=groups, bias=False)
            self.add_module(f'conv{index}', conv)
            self.add_module(f'bn{index}', build_norm_layer(norm_cfg, spec.out_channels)[1])
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, conv_cfg, norm_cfg)
        self._folded_cache: Optional[tuple] = None

    @staticmethod
    def conv_specs(in_channels: int, out_channels: int, stride: int) -> List[ConvSpec]:
        raise NotImplementedError

    @property
    def convs_and_norms(self) -> List[Tuple[nn.Conv2d, nn.Module]]:
        return [(getattr(self, f'conv{i}'), getattr(self, f'bn{i}'))
                for i in range(1, len(self.specs) + 1)]

    @property
    def last_norm(self) -> nn.Module:
        return getattr(self, f'bn{len(self.specs)}')

    def forward(self, x: Tensor, pixel_mask: Optional[Tensor] = None) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = x
        pairs = self.convs_and_norms
        for index, (conv, norm) in enumerate(pairs):
            if pixel_mask is not None:
                out = apply_group_mask(out, pixel_mask)
            out = conv(out)
            is_last = index == len(pairs) - 1
            if pixel_mask is not None and is_last and conv.kernel_size[0] > 1:
                # A last 3x3 conv (BasicBlock) would otherwise write one pixel
                # beyond the selection; keeping every conv inside it makes the
                # cost exactly rate x dense and lets the sparse path skip the halo.
                out = apply_group_mask(out, pixel_mask)
            out = norm(out)
            if not is_last:
                out = self.relu(out)
        out = out + identity
        return self.relu(out) if self.last_relu else out

    def folded(self) -> Tuple[List[FoldedConv], Optional[Tuple[Tensor, Tensor]]]:
        """BatchNorm-folded convolutions and 1x1 shortcut, cached until a weight changes.

        Only for stride-1 blocks (the refine branch), whose shortcut is either
        the identity (``None`` is returned) or a 1x1 conv + norm.
        """
        key = weights_key(self)
        if self._folded_cache is None or self._folded_cache[0] != key:
            if self.stride != 1:
                raise ValueError('only stride-1 blocks run on gathered patches')
            with torch.no_grad():
                convs = [
                    FoldedConv(*fold_conv_norm(conv, norm), spec.kernel_size,
                               self.dilation if spec.kernel_size > 1 else 1)
                    for (conv, norm), spec in zip(self.convs_and_norms, self.specs)
                ]
                shortcut = None if self.shortcut is None else fold_conv_norm(*self.shortcut[1:])
            self._folded_cache = (key, (convs, shortcut))
        return self._folded_cache[1]


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34); the first carries the stride."""

    expansion = 1

    @staticmethod
    def conv_specs(in_channels: int, out_channels: int, stride: int) -> List[ConvSpec]:
        return [ConvSpec(in_channels, out_channels, 3, stride),
                ConvSpec(out_channels, out_channels, 3)]


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 -> 1x1 with a 4x narrower middle (ResNet-50/101); the 3x3 carries the stride."""

    expansion = 4

    @staticmethod
    def conv_specs(in_channels: int, out_channels: int, stride: int) -> List[ConvSpec]:
        mid = out_channels // 4
        return [ConvSpec(in_channels, mid, 1), ConvSpec(mid, mid, 3, stride),
                ConvSpec(mid, out_channels, 1)]
