"""Residual blocks shared by every branch of SAR-ResNet.

One block class per ResNet block type serves the base branch, the refine
branch (grouped convolutions + patch masks), the stage transitions and the
plain last stage: only the arguments differ.
"""
import copy
import itertools
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer, build_plugin_layer
from mmcv.cnn.bricks import DropPath
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidArgumentError
from .masking import apply_group_mask
from .pooling import DepthwiseAvgPool2d

# Why the refine branch takes no deformable conv or plugin (one message for
# every place that refuses them).
REFINE_EXTRAS_ERROR = (
    'the refine branch runs each mask group on its selected patches only, and its sparse path '
    '(gather, plain convolution, scatter) must compute exactly what the dense masked path '
    'computes; a deformable conv (dcn) samples outside the patches and a plugin (attention, '
    'context) mixes all positions, so neither can be masked exactly. SARResNet gives dcn and '
    'plugins to the plain blocks of a stage (stage transitions, base branch, stage 4) only')


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
    """One convolution of a block: channels, kernel size, stride and groups.

    ``groups`` is this convolution's groups (None: the block's ``groups``,
    i.e. ``G``); it must be a multiple of the block's groups so that each
    channel group keeps its own channels (e.g. ResNeXt's cardinality).
    """
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    groups: Optional[int] = None


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


# What every deployed module says when asked to train.
DEPLOYED_TRAIN_ERROR = ('deployed models are inference-only (switch_to_deploy() folded the '
                        'BatchNorm layers); rebuild/reload the model to train')


def is_plain_conv(conv: nn.Module) -> bool:
    """Whether ``conv`` computes ``F.conv2d`` of its own weight (nn.Conv2d or mmcv's wrapper)."""
    forward = getattr(type(conv), 'forward', None)
    return isinstance(conv, nn.Conv2d) and (
        forward is nn.Conv2d.forward
        or type(conv).__module__.startswith('mmcv.cnn.bricks.wrappers'))


def check_plain_conv(conv: nn.Module, name: str) -> None:
    """Refuse a convolution whose forward is not ``F.conv2d`` of its weight (e.g. ConvWS).

    Folding BatchNorm into ``conv.weight`` and running the weight on gathered
    patches is exact only for a plain convolution.
    """
    if not is_plain_conv(conv):
        raise TypeError(f'{name}: BatchNorm folding and sparse inference need a plain '
                        f'convolution (conv_cfg=None), got {type(conv).__name__}; use '
                        "inference_mode='dense' without switch_to_deploy()")


def folded_conv(conv: nn.Conv2d, norm: nn.Module, name: str) -> nn.Conv2d:
    """A new ``nn.Conv2d`` with bias computing ``norm(conv(x))`` (eval statistics).

    3x3 (and larger) weights are channels-last: the layout oneDNN wants for
    the gathered windows of the sparse path, and as good for dense maps.
    """
    check_plain_conv(conv, name)
    with torch.no_grad():
        weight, bias = fold_conv_norm(conv, norm)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                          device=weight.device, dtype=weight.dtype)
        if weight.shape[-1] > 1:
            weight = weight.contiguous(memory_format=torch.channels_last)
        fused.weight = nn.Parameter(weight.detach().clone(memory_format=torch.preserve_format),
                                    requires_grad=False)
        fused.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return fused


def _masked_conv(conv: nn.Conv2d, x: Tensor, pixel_mask: Tensor) -> Tensor:
    """``mask(conv(x))`` of a block's last 3x3 conv, a folded bias added after the mask.

    With BatchNorm folded (:meth:`ResidualBlock.switch_to_deploy` or mmcv's
    ``fuse_conv_bn``) the conv carries the norm's shift, which the unfolded
    model adds at every pixel, masked out or not.
    """
    if conv.bias is None or not is_plain_conv(conv):
        return apply_group_mask(conv(x), pixel_mask)
    out = apply_group_mask(conv._conv_forward(x, conv.weight, None), pixel_mask)
    return out + conv.bias.view(1, -1, 1, 1).to(out.dtype)


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

    The ResNet block options of mmdet / mmpretrain apply to unmasked use (the
    stage transitions, the base branch and stage 4): ``dcn`` replaces the 3x3
    convolution by a deformable one and ``plugins`` insert mmcv plugin layers
    after a convolution (Bottleneck only, as upstream). A block carrying
    either refuses a pixel mask and the sparse path (see
    ``REFINE_EXTRAS_ERROR``). ``drop_path_rate`` (stochastic depth) drops the
    whole residual branch per sample in training and is the identity in
    evaluation, so it applies to masked blocks as well: the sparse path,
    which runs in evaluation only, stays exact.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the block. Defaults to 1.
        dilation (int): Dilation of the 3x3 convolutions. Defaults to 1.
        groups (int): Channel groups ``G`` of every convolution. Defaults to 1.
        last_relu (bool): Whether to apply the final ReLU. Defaults to True.
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config.
        dcn (dict, optional): Deformable conv config for the 3x3 convolution,
            e.g. ``dict(type='DCNv2', deform_groups=1)`` (mmcv's ``DCN`` /
            ``DCNv2``); ``fallback_on_stride=True`` keeps a plain conv in a
            strided block. Needs ``conv_cfg=None``. Defaults to None.
        plugins (Sequence[dict], optional): mmcv plugin layers, each
            ``dict(cfg=dict(type=...), position='after_conv1' | 'after_conv2'
            | 'after_conv3')``; a ``postfix`` in ``cfg`` tells apart plugins
            of one type. Defaults to None.
        drop_path_rate (float): Stochastic depth probability of the residual
            branch, in [0, 1). Defaults to 0.
    """

    expansion: int = 1
    # Which convolution (1-based) a ``dcn`` config replaces; None: not supported.
    dcn_conv: Optional[int] = None
    # Positions a plugin may take; empty: plugins not supported.
    plugin_positions: Tuple[str, ...] = ()

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, last_relu: bool = True,
                 conv_cfg: Optional[dict] = None, norm_cfg: dict = dict(type='BN'),
                 dcn: Optional[dict] = None, plugins: Optional[Sequence[dict]] = None,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.last_relu = last_relu
        self.specs = self.conv_specs(in_channels, out_channels, stride)
        dcn_cfg, fallback_on_stride = self._check_dcn(dcn, conv_cfg)
        for index, spec in enumerate(self.specs, start=1):
            conv_groups = groups if spec.groups is None else spec.groups
            if conv_groups % groups:
                raise ValueError(f'conv{index} has {conv_groups} groups, not a multiple of the '
                                 f'block\'s groups G={groups}: each channel group must keep its '
                                 'own channels')
            deformable = dcn_cfg is not None and index == self.dcn_conv and not (
                fallback_on_stride and spec.stride > 1)
            padding = dilation * (spec.kernel_size // 2)
            conv = build_conv_layer(
                copy.deepcopy(dcn_cfg) if deformable else conv_cfg, spec.in_channels,
                spec.out_channels, spec.kernel_size, stride=spec.stride, padding=padding,
                dilation=dilation if spec.kernel_size > 1 else 1, groups=conv_groups, bias=False)
            self.add_module(f'conv{index}', conv)
            self.add_module(f'bn{index}', build_norm_layer(norm_cfg, spec.out_channels)[1])
        self.with_dcn = dcn_cfg is not None
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, conv_cfg, norm_cfg)
        # Plugin module names after each convolution (index 0: after conv1).
        self.plugin_names: Tuple[Tuple[str, ...], ...] = self._make_plugins(plugins)
        self.drop_path = _make_drop_path(drop_path_rate)
        self._folded_cache: Optional[tuple] = None
        self._deployed = False

    # ------------------------------------------------------------ options
    def _check_dcn(self, dcn: Optional[dict],
                   conv_cfg: Optional[dict]) -> Tuple[Optional[dict], bool]:
        """The deformable conv config without ``fallback_on_stride``, and that flag."""
        if dcn is None:
            return None, False
        name = type(self).__name__
        if not isinstance(dcn, dict) or 'type' not in dcn:
            raise InvalidArgumentError(f"dcn must be None or a conv config dict with a 'type' "
                                       f"(e.g. dict(type='DCNv2', deform_groups=1)), got {dcn!r}")
        if self.dcn_conv is None:
            raise InvalidArgumentError(
                f'dcn is not implemented for {name} (as in mmdet, only the Bottleneck of '
                'ResNet-50/101 takes a deformable 3x3 conv); use depth=50 or 101')
        if conv_cfg is not None:
            raise InvalidArgumentError(f'conv_cfg must be None when dcn is given (dcn replaces '
                                       f'the 3x3 conv of {name}), got conv_cfg={conv_cfg!r}')
        cfg = dict(dcn)
        fallback_on_stride = bool(cfg.pop('fallback_on_stride', False))
        # mmcv registers DCN / DCNv2 when its ops are imported (mmdet does it
        # on import); a config used without mmdet must find them as well.
        import mmcv.ops  # noqa: F401
        return cfg, fallback_on_stride

    def _make_plugins(self, plugins: Optional[Sequence[dict]]) -> Tuple[Tuple[str, ...], ...]:
        """Build the plugin layers; their module names per position."""
        names: List[List[str]] = [[] for _ in self.specs]
        if not plugins:
            return tuple(tuple(n) for n in names)
        name = type(self).__name__
        if not self.plugin_positions:
            raise InvalidArgumentError(
                f'plugins are not implemented for {name} (as in mmdet, only the Bottleneck of '
                'ResNet-50/101 takes plugin layers); use depth=50 or 101')
        if isinstance(plugins, (str, dict)) or not isinstance(plugins, Sequence):
            raise InvalidArgumentError(f'plugins must be a list of dict(cfg=..., position=...), '
                                       f'got {plugins!r}')
        for plugin in plugins:
            if not isinstance(plugin, dict) or not isinstance(plugin.get('cfg'), dict) or \
                    set(plugin) - {'cfg', 'position', 'stages'}:
                raise InvalidArgumentError(
                    f"each plugin must be dict(cfg=dict(type=...), position=...), got {plugin!r}")
            position = plugin.get('position')
            if position not in self.plugin_positions:
                raise InvalidArgumentError(
                    f'plugin position must be one of {self.plugin_positions} for {name}, got '
                    f'{position!r}')
            index = self.plugin_positions.index(position)
            cfg = dict(plugin['cfg'])
            postfix = cfg.pop('postfix', '')
            layer_name, layer = build_plugin_layer(
                cfg, postfix=postfix, in_channels=self.specs[index].out_channels)
            if hasattr(self, layer_name):
                raise InvalidArgumentError(
                    f'duplicate plugin name {layer_name!r} in {name}: give plugins of the same '
                    "type different cfg['postfix'] values")
            self.add_module(layer_name, layer)
            names[index].append(layer_name)
        return tuple(tuple(n) for n in names)

    @property
    def with_plugins(self) -> bool:
        return any(self.plugin_names)

    def _check_maskable(self) -> None:
        """Refuse masks and the sparse path for a block with a deformable conv or plugins."""
        if self.with_dcn or self.with_plugins:
            extras = ' and '.join(what for what, has in (('dcn', self.with_dcn),
                                                         ('plugins', self.with_plugins)) if has)
            raise ValueError(f'{type(self).__name__} with {extras} cannot run masked: '
                             f'{REFINE_EXTRAS_ERROR}')

    def init_extra_weights(self) -> None:
        """Re-apply the own initialisation of deformable convs and plugins.

        A backbone-wide Kaiming pass would give a deformable conv non-zero
        offsets and undo a plugin's zero-initialised output (ContextBlock,
        NonLocal2d): both must start as the plain block, as upstream.
        """
        if self.with_dcn:
            offset = getattr(getattr(self, f'conv{self.dcn_conv}'), 'conv_offset', None)
            if offset is not None:
                nn.init.zeros_(offset.weight)
                if offset.bias is not None:
                    nn.init.zeros_(offset.bias)
        for layer_name in itertools.chain.from_iterable(self.plugin_names):
            layer = getattr(self, layer_name)
            init = getattr(layer, 'init_weights', None) or getattr(layer, 'reset_parameters', None)
            if init is not None:
                init()

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
        if pixel_mask is not None and (self.with_dcn or self.with_plugins):
            self._check_maskable()
        identity = x if self.shortcut is None else self.shortcut(x)
        out = x
        pairs = self.convs_and_norms
        for index, (conv, norm) in enumerate(pairs):
            if pixel_mask is not None:
                out = apply_group_mask(out, pixel_mask)
            is_last = index == len(pairs) - 1
            if pixel_mask is not None and is_last and conv.kernel_size[0] > 1:
                # A last 3x3 conv (BasicBlock) would otherwise write one pixel
                # beyond the selection; keeping every conv inside it makes the
                # cost exactly rate x dense and lets the sparse path skip the halo.
                out = _masked_conv(conv, out, pixel_mask)
            else:
                out = conv(out)
            out = norm(out)
            if not is_last:
                out = self.relu(out)
            for layer_name in self.plugin_names[index]:
                out = getattr(self, layer_name)(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        out = out + identity
        return self.relu(out) if self.last_relu else out

    @property
    def deployed(self) -> bool:
        """Whether :meth:`switch_to_deploy` has folded the norms (inference only)."""
        return self._deployed

    def train(self, mode: bool = True) -> 'ResidualBlock':
        if mode and self._deployed:
            raise RuntimeError(DEPLOYED_TRAIN_ERROR)
        return super().train(mode)

    def folded(self) -> Tuple[List[FoldedConv], Optional[Tuple[Tensor, Tensor]]]:
        """BatchNorm-folded convolutions and 1x1 shortcut of a model that was not deployed.

        Cached until a weight changes (checked by walking the weights on every
        call: deploying, :meth:`switch_to_deploy`, removes that walk). Weights
        are channels-last, the layout of the gathered inputs, so that oneDNN
        need not reorder them on every call. Only for stride-1 blocks (the
        refine branch), whose shortcut is either the identity (``None`` is
        returned) or a 1x1 conv + norm.
        """
        self._check_maskable()
        key = weights_key(self)
        if self._folded_cache is None or self._folded_cache[0] != key:
            if self.stride != 1:
                raise ValueError('only stride-1 blocks run on gathered patches')
            # Normal tensors even when first called under inference_mode, so
            # that an eval forward with autograd can use them later.
            with torch.inference_mode(False), torch.no_grad():
                convs = []
                for (conv, norm), spec in zip(self.convs_and_norms, self.specs):
                    weight, bias = fold_conv_norm(conv, norm)
                    convs.append(FoldedConv(weight.contiguous(memory_format=torch.channels_last),
                                            bias, spec.kernel_size,
                                            self.dilation if spec.kernel_size > 1 else 1))
                shortcut = None if self.shortcut is None else fold_conv_norm(*self.shortcut[1:])
            self._folded_cache = (key, (convs, shortcut))
        return self._folded_cache[1]

    def sparse_weights(self) -> Tuple[List[Tuple[Tensor, Tensor]], Optional[Tuple[Tensor, Tensor]]]:
        """``(weight, bias)`` of each folded convolution and of the 1x1 shortcut (None: identity).

        A deployed block reads its own (folded) convolutions: no walk, no
        cache, nothing that can go stale.
        """
        self._check_maskable()
        if not self._deployed:
            convs, shortcut = self.folded()
            return [(conv.weight, conv.bias) for conv in convs], shortcut
        if self.stride != 1:
            raise ValueError('only stride-1 blocks run on gathered patches')
        convs = [(conv.weight, conv.bias) for conv, _ in self.convs_and_norms]
        if self.shortcut is None:
            return convs, None
        return convs, (self.shortcut[1].weight, self.shortcut[1].bias)

    def switch_to_deploy(self) -> None:
        """Fold every norm into its convolution, once (mmpretrain RepVGG style).

        Each ``conv_i`` + ``bn_i`` (and the shortcut's conv + norm) becomes one
        convolution with a bias and an ``nn.Identity``: the module's weights
        are the prepared state. Weights of convolutions followed by more than
        a 1x1 product are stored channels-last, the layout of the sparse
        path's gathered windows. The dense forward computes the same function.
        """
        if self.training:
            raise RuntimeError('switch_to_deploy() needs an eval model: call .eval() first')
        self.check_deployable()
        for index, (conv, norm) in enumerate(self.convs_and_norms, start=1):
            setattr(self, f'conv{index}', folded_conv(conv, norm, f'conv{index}'))
            setattr(self, f'bn{index}', nn.Identity())
        if self.shortcut is not None and len(self.shortcut) == 3:
            self.shortcut[1] = folded_conv(self.shortcut[1], self.shortcut[2], 'shortcut.1')
            self.shortcut[2] = nn.Identity()
        self._folded_cache = None
        self._deployed = True

    def check_deployable(self, name: str = '') -> None:
        """Refuse deploying a block whose deformable conv or plugins cannot be folded.

        Called before anything changes, so that a refused deploy leaves the
        model as it was.
        """
        if self.with_dcn or self.with_plugins:
            where = name or type(self).__name__
            raise TypeError(
                f'switch_to_deploy() folds BatchNorm into plain convolutions; {where} has a '
                'deformable conv (dcn) or plugins, which it cannot fold: keep the model '
                "undeployed (eval() with inference_mode='sparse' still runs the refine "
                'branch on its selected patches only)')


def _make_drop_path(rate: float) -> Optional[nn.Module]:
    """mmcv's ``DropPath`` (stochastic depth) for ``0 < rate < 1``; None at 0."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise InvalidArgumentError(f'drop_path_rate must be a number in [0, 1), got {rate!r}')
    return DropPath(drop_prob=float(rate)) if rate > 0 else None


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
    dcn_conv = 2
    plugin_positions = ('after_conv1', 'after_conv2', 'after_conv3')

    @staticmethod
    def conv_specs(in_channels: int, out_channels: int, stride: int) -> List[ConvSpec]:
        mid = out_channels // 4
        return [ConvSpec(in_channels, mid, 1), ConvSpec(mid, mid, 3, stride),
                ConvSpec(mid, out_channels, 1)]
