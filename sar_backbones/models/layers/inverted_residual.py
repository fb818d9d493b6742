"""MobileNetV2's inverted residual block, usable plain or masked (SAR-MobileNetV2).

One class serves every branch of SAR-MobileNetV2, as :class:`ResidualBlock`
does for SAR-ResNet: the plain layers, the dense entry block of a SAR layer,
its low-resolution base branch and its refine branch (``groups=G`` and patch
masks). Its state-dict keys follow mmpretrain / mmseg's ``InvertedResidual``
(``conv.0.conv.weight``, ``conv.0.bn.weight``, ...).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError
from .blocks import fold_conv_norm, folded_conv, weights_key
from .masking import apply_group_mask

# The activations the sparse path reproduces: ReLU6 (MobileNetV2) or ReLU,
# with the upper clamp each applies (None: none).
ACTIVATION_CLAMPS = {'ReLU6': 6.0, 'ReLU': None}


def activation_clamp(act_cfg: Optional[dict]) -> Optional[float]:
    """Upper bound of the hidden activation ``act_cfg`` (ReLU6: 6, ReLU: None).

    Raises:
        InvalidArgumentError: for other activations, naming ``act_cfg``.
    """
    act_type = act_cfg.get('type') if isinstance(act_cfg, dict) else None
    if act_type not in ACTIVATION_CLAMPS:
        raise InvalidArgumentError(
            f"act_cfg must be dict(type='ReLU6') (MobileNetV2) or dict(type='ReLU'), got "
            f'{act_cfg!r}: the refine branch masks after the activation and its sparse path '
            'reproduces these two exactly')
    return ACTIVATION_CLAMPS[act_type]


class InvertedResidual(nn.Module):
    """``y = x + project(dw3x3(expand(x)))`` (MobileNetV2); residual iff stride 1 and ``in == out``.

    The expansion 1x1 (absent for ``expand_ratio=1``) and the depthwise 3x3
    are followed by norm + ReLU6; the projection 1x1 by a norm only (linear
    bottleneck). With ``groups=G`` the two 1x1 convolutions are split into
    ``G`` channel groups and the depthwise conv is grouped anyway, so that
    mask group ``g`` keeps channels ``[g*C/G, (g+1)*C/G)`` of every layer.

    Given a pixel mask ``(B, G, H, W)``, the block input and the output of
    every hidden activation are zeroed outside the regions selected for their
    group (Eq. 3, as SAR-ResNet's refine blocks); the residual takes the
    unmasked input and the last norm is not masked: at an unselected pixel the
    block outputs ``x + BN shift``. The depthwise conv therefore reads zeros
    at unselected neighbours, and the sparse path
    (:mod:`sar_backbones.inference.sparse_inverted_residual`) only needs the
    selected patches.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the depthwise conv, 1 or 2.
        expand_ratio (float): Hidden width ``round(in_channels * expand_ratio)``.
        dilation (int): Dilation of the depthwise conv. Defaults to 1.
        groups (int): Mask groups ``G`` of the 1x1 convolutions. Defaults to 1.
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Activation config. Defaults to ``dict(type='ReLU6')``.
        with_cp (bool): Gradient checkpointing of the block (unmasked use).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: float,
                 dilation: int = 1, groups: int = 1, conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'), act_cfg: dict = dict(type='ReLU6'),
                 with_cp: bool = False) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise InvalidArgumentError(f'InvertedResidual stride must be 1 or 2, got {stride!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.with_cp = with_cp
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.hidden_channels = hidden = int(round(in_channels * expand_ratio))
        for label, width in (('input', in_channels), ('hidden', hidden),
                             ('output', out_channels)):
            if width % groups:
                raise InvalidArgumentError(
                    f'mask_groups (G={groups}) must divide the {label} width ({width}) of an '
                    f'inverted residual block ({in_channels} -> {hidden} -> {out_channels})')
        self.clamp = activation_clamp(act_cfg)
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvModule(in_channels, hidden, 1, groups=groups, act_cfg=act_cfg,
                                     **common))
        layers.append(ConvModule(hidden, hidden, 3, stride=stride, padding=dilation,
                                 dilation=dilation, groups=hidden, act_cfg=act_cfg, **common))
        layers.append(ConvModule(hidden, out_channels, 1, groups=groups, act_cfg=None, **common))
        self.conv = nn.Sequential(*layers)
        self._folded_cache: Optional[tuple] = None
        self._deployed = False

    @property
    def convs_and_norms(self) -> List[Tuple[nn.Conv2d, nn.Module]]:
        """``(conv, norm)`` of the expansion (if any), depthwise and projection layers."""
        return [(layer.conv, layer.norm) for layer in self.conv]

    @property
    def last_norm(self) -> nn.Module:
        return self.conv[-1].norm

    def _residual(self, x: Tensor, pixel_mask: Optional[Tensor]) -> Tensor:
        out = x if pixel_mask is None else apply_group_mask(x, pixel_mask)
        last = len(self.conv) - 1
        for index, layer in enumerate(self.conv):  # conv -> norm (-> activation)
            out = layer(out)
            if pixel_mask is not None and index < last:
                out = apply_group_mask(out, pixel_mask)
        return out

    def forward(self, x: Tensor, pixel_mask: Optional[Tensor] = None) -> Tensor:
        def inner(x: Tensor) -> Tensor:
            out = self._residual(x, pixel_mask)
            return x + out if self.use_res_connect else out

        if self.with_cp and pixel_mask is None and x.requires_grad:
            return checkpoint(inner, x, use_reentrant=False)
        return inner(x)

    @property
    def deployed(self) -> bool:
        """Whether :meth:`switch_to_deploy` has folded the norms (inference only)."""
        return self._deployed

    def switch_to_deploy(self) -> None:
        """Fold every norm into its convolution, once (mmpretrain RepVGG style).

        Each ``conv.i`` becomes a convolution with a bias followed by an
        ``nn.Identity`` norm (depthwise weights channels-last): the dense and
        masked forwards compute the same function, and the sparse path reads
        the folded weights without a cache.
        """
        if self.training:
            raise RuntimeError('switch_to_deploy() needs an eval model: call .eval() first')
        if self._deployed:
            return
        for index, layer in enumerate(self.conv):
            layer.conv = folded_conv(layer.conv, layer.norm, f'conv.{index}.conv')
            setattr(layer, layer.norm_name, nn.Identity())
        self._folded_cache = None
        self._deployed = True

    def sparse_weights(self) -> List[Tuple[Tensor, Tensor]]:
        """BatchNorm-folded ``(weight, bias)`` of each convolution, cached until a weight changes.

        Weights of the depthwise conv are channels-last, the layout of the
        sparse path's gathered windows. A deployed block hands over its own
        (folded) convolutions: no walk over the weights, no cache.
        """
        if self._deployed:
            return [(layer.conv.weight, layer.conv.bias) for layer in self.conv]
        key = weights_key(self)
        if self._folded_cache is None or self._folded_cache[0] != key:
            if self.stride != 1:
                raise ValueError('only stride-1 inverted residual blocks run on gathered patches')
            with torch.inference_mode(False), torch.no_grad():
                folded = []
                for conv, norm in self.convs_and_norms:
                    weight, bias = fold_conv_norm(conv, norm)
                    if weight.shape[-1] > 1:
                        weight = weight.contiguous(memory_format=torch.channels_last)
                    folded.append((weight, bias))
            self._folded_cache = (key, folded)
        return self._folded_cache[1]
