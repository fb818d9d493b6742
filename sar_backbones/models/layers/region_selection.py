"""Region selection (paper Sec. III-A.2, Eq. 2 and Eq. 8-9)."""
import weakref
from typing import Callable, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as torch_module
from mmcv.cnn import build_norm_layer
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import DEPLOYED_TRAIN_ERROR, check_plain_conv, fold_conv_norm, weights_key
from .gumbel import straight_through_gumbel

# Initial logits of {skip, keep}: keep wins by a wide margin, so that training
# starts with every region selected (paper: "initialized to select the whole
# feature maps"), as in the authors' model.
_INIT_SKIP_LOGIT = 1.0
_INIT_KEEP_LOGIT = 10.0


class RegionSelector(nn.Module):
    """Predicts which patches of each channel group the refine block processes.

    ``logits = W_1x1 * AvgPool_K(ReLU(BN(W_3x3 * x_base)))`` (Eq. 2) with all
    convolutions grouped by ``G`` so that each group decides for itself.

    The norm is the backbone's ``norm_cfg`` with one exception: a GroupNorm
    config (``type='GN'``) is built with ``G`` groups, one per mask group,
    whatever its ``num_groups``. The hidden layer has only
    ``hidden_per_group * G`` channels (4G), which the usual 32 groups of
    mmdet/mmseg GN configs do not divide, and a norm group spanning two
    mask groups would let one group's features shift the other's decision.
    Per-channel norms (BatchNorm, SyncBN) are built as configured.

    Args:
        in_channels (int): Channels of the base-branch feature ``C/alpha``.
        groups (int): Number of channel groups ``G`` of the refine branch.
        norm_cfg (dict): Norm layer config (GroupNorm: see above).
        hidden_per_group (int): Hidden channels per group. Defaults to 4.

    Example:
        >>> selector = RegionSelector(in_channels=128, groups=2)
        >>> mask = selector.eval()(torch.rand(1, 128, 28, 28), grid=(14, 14), tau=1.0)
        >>> mask.shape, bool(mask.all())  # everything selected at init
        (torch.Size([1, 2, 14, 14]), True)
    """

    def __init__(self, in_channels: int, groups: int, norm_cfg: dict = dict(type='BN'),
                 hidden_per_group: int = 4) -> None:
        super().__init__()
        hidden = hidden_per_group * groups
        self.groups = groups
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1, groups=groups, bias=False)
        self.norm = build_norm_layer(selector_norm_cfg(norm_cfg, groups), hidden)[1]
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Conv2d(hidden, 2 * groups, 1, groups=groups, bias=True)
        # Scale of the Gumbel noise in training (1: the paper's sampling).
        self.noise_scale = 1.0
        # Noise-free margin keep - skip of the last training forward (float32,
        # with its graph), for the backbone's deterministic-rate loss; the
        # backbone takes it into its record and clears it here.
        self.last_margin = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        # Small weights keep the initial decision at the bias (select all),
        # whatever the features look like.
        nn.init.normal_(self.fc.weight, std=1e-3)
        with torch.no_grad():
            self.fc.bias.view(self.groups, 2).copy_(
                torch.tensor([_INIT_SKIP_LOGIT, _INIT_KEEP_LOGIT]))

    def logits(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        """Logits ``(B, G, 2, Kh, Kw)`` of {skip, keep} per group and patch."""
        hidden = self.relu(self.norm(self.conv(x)))
        out = self.fc(F.adaptive_avg_pool2d(hidden, grid))
        return out.view(x.shape[0], self.groups, 2, grid[0], grid[1])

    def forward(self, x: Tensor, grid: Tuple[int, int], tau: float) -> Tensor:
        """Binary mask ``(B, G, Kh, Kw)``: 1 = refine this patch.

        Training samples with the straight-through Gumbel-softmax at
        temperature ``tau``; evaluation is deterministic (keep where the keep
        logit wins), with no noise.
        """
        logits = self.logits(x, grid)
        skip, keep = logits.unbind(dim=2)
        if self.training:
            self.last_margin = keep.float() - skip.float()
            return straight_through_gumbel(keep, skip, tau, noise_scale=self.noise_scale)
        check_finite_logits(logits, lambda: 'a region selector')
        return (keep > skip).to(x.dtype)


def selector_norm_cfg(norm_cfg: dict, groups: int) -> dict:
    """The norm config of a region selector: GroupNorm gets one group per mask group ``G``."""
    if isinstance(norm_cfg, dict) and norm_cfg.get('type') == 'GN':
        return {**norm_cfg, 'num_groups': groups}
    return norm_cfg


def check_finite_logits(logits: Tensor, describe: Callable[[], str]) -> None:
    """Raise if inference logits are NaN or infinite (eager only).

    ``keep > skip`` is False for NaN, so a diverged selector would silently
    refine nothing. The check costs one device synchronisation; it is left
    out under ``torch.compile`` and CUDA graph capture, where it cannot run.
    """
    if torch.compiler.is_compiling() or (
            logits.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            f'{describe()} produced non-finite {{skip, keep}} logits at inference, which would '
            'silently refine nothing; check the input image for NaN/inf and the selector '
            'weights (a diverged or corrupted checkpoint)')


class _StackedSelectors(NamedTuple):
    """The selectors of a stage as one pair of grouped convolutions (BN folded)."""
    conv_weight: Tensor  # (N*4G, C/G, 3, 3), groups N*G
    conv_bias: Tensor
    fc_weight: Tensor    # (N*2G, 4, 1, 1), groups N*G
    fc_bias: Tensor


# Stack the selectors' inputs only while the copy is cheap (see RegionSelectors).
_STACK_MAX_BYTES = 2 * 2**20
_stacked_cache: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def _global_hooks() -> bool:
    """Whether hooks for every module are registered (``register_module_forward_hook``)."""
    return bool(getattr(torch_module, '_global_forward_hooks', None)
                or getattr(torch_module, '_global_forward_pre_hooks', None))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class RegionSelectors(nn.ModuleList):
    """The ``N`` region selectors of one SAR stage, one per masked block, called together.

    A plain ``nn.ModuleList`` of :class:`RegionSelector` (same state-dict keys)
    whose forward maps the ``N`` base-branch features to the ``N`` masks. In
    training each selector samples on its own. At inference the selectors'
    inputs all have the same size, so they are stacked along the channels and
    run as one grouped convolution, one pooling and one FC with ``N*G``
    groups: the same per-group arithmetic (BN folded), one call per layer
    instead of ``N``, whose fixed costs dominate on small maps (the selectors
    of SAR-ResNet50 at 224x224: 1.45 -> 1.13 ms on one core). On large maps
    the pass over a freshly copied stacked input costs more than the calls
    it saves (800x1216: 29 ms against 14.7), so only inputs of up to 2 MiB
    in all are stacked. The fast path also steps aside when it cannot reproduce the
    modules (a norm other than BatchNorm) or would hide them (forward hooks
    on a selector or its layers, e.g. a FLOPs counter).

    Example:
        >>> selectors = RegionSelectors(RegionSelector(64, groups=2) for _ in range(3)).eval()
        >>> masks = selectors([torch.rand(1, 64, 14, 14)] * 3, grid=(7, 7), tau=1.0)
        >>> len(masks), masks[0].shape
        (3, torch.Size([1, 2, 7, 7]))
    """

    def forward(self, features: Sequence[Tensor], grid: Tuple[int, int],
                tau: float) -> List[Tensor]:
        """Masks ``(B, G, Kh, Kw)`` of every selector from its feature ``(B, C, h, w)``."""
        if len(features) != len(self):
            raise ValueError(f'{len(self)} region selectors got {len(features)} features')
        if _stack_inputs(features) and self.can_stack():
            return self._stacked_forward(features, grid)
        masks = []
        for index, (selector, feature) in enumerate(zip(self, features)):
            try:
                masks.append(selector(feature, grid, tau))
            except FloatingPointError as error:
                raise FloatingPointError(str(error).replace(
                    'a region selector', f'{self.name}.{index} (the selector of refine block '
                    f'{index})', 1)) from None
        return masks

    # Where the selectors sit in the model, for error messages (the SAR stage sets it).
    name = 'selectors'

    def switch_to_deploy(self) -> 'StackedRegionSelectors':
        """The selectors stacked into one module, BatchNorm folded.

        Returns:
            StackedRegionSelectors: The deployed selectors.
        """
        return StackedRegionSelectors(self)

    def can_stack(self) -> bool:
        """Whether the forward runs the selectors stacked (see the class docstring)."""
        if self.training or _global_hooks():
            return False
        return all(
            not selector.training and isinstance(selector.norm, (_BatchNorm, nn.Identity))
            and not any(_has_hooks(module) for module in selector.modules())
            for selector in self)

    def _stacked_weights(self) -> _StackedSelectors:
        """BN-folded, concatenated weights, cached until a weight of a selector changes."""
        cached = _stacked_cache.get(self)
        key = weights_key(self)
        if cached is not None and cached[0] == key:
            return cached[1]
        # Normal tensors even when first called under inference_mode, so that an
        # eval forward with autograd (e.g. saliency maps) can use them later.
        with torch.inference_mode(False), torch.no_grad():
            folded = [fold_conv_norm(selector.conv, selector.norm) for selector in self]
            stacked = _StackedSelectors(
                torch.cat([weight for weight, _ in folded]),
                torch.cat([bias for _, bias in folded]),
                torch.cat([selector.fc.weight for selector in self]),
                torch.cat([selector.fc.bias for selector in self]))
        _stacked_cache[self] = (key, stacked)
        return stacked

    def _stacked_forward(self, features: Sequence[Tensor], grid: Tuple[int, int]) -> List[Tensor]:
        stacked = self._stacked_weights()
        groups_per_selector = self[0].groups
        groups = len(self) * groups_per_selector
        x = torch.cat(list(features), dim=1)
        dtype = x.dtype
        hidden = F.conv2d(x, stacked.conv_weight.to(dtype), stacked.conv_bias.to(dtype),
                          padding=1, groups=groups).relu_()
        logits = F.conv2d(F.adaptive_avg_pool2d(hidden, grid), stacked.fc_weight.to(dtype),
                          stacked.fc_bias.to(dtype), groups=groups)
        logits = logits.view(x.shape[0], len(self), groups_per_selector, 2, *grid)
        check_finite_logits(logits, lambda: _first_non_finite(logits, self.name))
        skip, keep = logits.unbind(dim=3)
        return list((keep > skip).to(dtype).unbind(dim=1))


def _stack_inputs(features: Sequence[Tensor]) -> bool:
    """Whether stacking the selectors' inputs is cheap (see :class:`RegionSelectors`)."""
    return sum(feature.numel() * feature.element_size() for feature in features) \
        <= _STACK_MAX_BYTES


def _first_non_finite(logits: Tensor, name: str) -> str:
    """Name the first selector whose logits ``(B, N, G, 2, Kh, Kw)`` are not finite."""
    bad = (~torch.isfinite(logits)).transpose(0, 1).flatten(1).any(1)
    index = int(bad.nonzero()[0]) if bool(bad.any()) else 0
    return f'{name}.{index} (the selector of refine block {index})'


class StackedRegionSelectors(nn.Module):
    """The ``N`` region selectors of a stage as one deployed module (BatchNorm folded).

    What :meth:`RegionSelectors.switch_to_deploy` returns: the selectors' 3x3
    convolutions (with their norms folded) and their 1x1 FCs concatenated
    along the output channels into two grouped convolutions of ``N*G``
    groups, which are the module's only weights. Small inputs are stacked
    and run in one call per layer; large ones (over 2 MiB in all, see
    :class:`RegionSelectors`) run selector by selector on views of the same
    weights. Same masks as the selectors in eval mode.

    Args:
        selectors (RegionSelectors): Eval-mode selectors with BatchNorm (or
            an ``nn.Identity`` left by ``mmcv.cnn.fuse_conv_bn``).
    """

    def __init__(self, selectors: RegionSelectors) -> None:
        super().__init__()
        if selectors.training:
            raise RuntimeError('switch_to_deploy() needs an eval model: call .eval() first')
        first = selectors[0]
        self.num_selectors = len(selectors)
        self.groups = first.groups
        self.name = selectors.name
        groups = self.num_selectors * self.groups
        hidden = first.conv.out_channels
        folded = []
        for index, selector in enumerate(selectors):
            check_plain_conv(selector.conv, f'{self.name}.{index}.conv')
            try:
                folded.append(fold_conv_norm(selector.conv, selector.norm))
            except TypeError as error:
                raise TypeError(f'{self.name}.{index}.norm: {error}') from None
        with torch.no_grad():
            self.conv = nn.Conv2d(first.conv.in_channels * self.num_selectors,
                                  hidden * self.num_selectors, 3, padding=1, groups=groups,
                                  device=first.conv.weight.device, dtype=first.conv.weight.dtype)
            self.conv.weight.copy_(torch.cat([weight for weight, _ in folded]))
            self.conv.bias.copy_(torch.cat([bias for _, bias in folded]))
            self.fc = nn.Conv2d(hidden * self.num_selectors, first.fc.out_channels *
                                self.num_selectors, 1, groups=groups,
                                device=first.fc.weight.device, dtype=first.fc.weight.dtype)
            self.fc.weight.copy_(torch.cat([selector.fc.weight for selector in selectors]))
            self.fc.bias.copy_(torch.cat([selector.fc.bias for selector in selectors]))
        self.requires_grad_(False)

    def __len__(self) -> int:
        return self.num_selectors

    def train(self, mode: bool = True) -> 'StackedRegionSelectors':
        if mode:
            raise RuntimeError(DEPLOYED_TRAIN_ERROR)
        return super().train(mode)

    def forward(self, features: Sequence[Tensor], grid: Tuple[int, int],
                tau: float) -> List[Tensor]:
        """Masks ``(B, G, Kh, Kw)`` of every selector (``tau`` is unused: eval only)."""
        if len(features) != self.num_selectors:
            raise ValueError(f'{self.num_selectors} region selectors got {len(features)} features')
        groups = self.num_selectors * self.groups
        dtype = features[0].dtype
        conv_weight, conv_bias = _cast(self.conv.weight, dtype), _cast(self.conv.bias, dtype)
        fc_weight, fc_bias = _cast(self.fc.weight, dtype), _cast(self.fc.bias, dtype)
        if _stack_inputs(features):
            hidden = F.conv2d(torch.cat(list(features), dim=1), conv_weight, conv_bias,
                              padding=1, groups=groups).relu_()
            logits = F.conv2d(F.adaptive_avg_pool2d(hidden, grid), fc_weight, fc_bias,
                              groups=groups)
        else:
            hidden_width = conv_weight.shape[0] // self.num_selectors
            logit_width = fc_weight.shape[0] // self.num_selectors
            per_selector = []
            for index, feature in enumerate(features):
                conv_rows = slice(index * hidden_width, (index + 1) * hidden_width)
                fc_rows = slice(index * logit_width, (index + 1) * logit_width)
                hidden = F.conv2d(feature, conv_weight[conv_rows], conv_bias[conv_rows],
                                  padding=1, groups=self.groups).relu_()
                per_selector.append(F.conv2d(F.adaptive_avg_pool2d(hidden, grid),
                                             fc_weight[fc_rows], fc_bias[fc_rows],
                                             groups=self.groups))
            logits = torch.cat(per_selector, dim=1)
        logits = logits.view(features[0].shape[0], self.num_selectors, self.groups, 2, *grid)
        check_finite_logits(logits, lambda: _first_non_finite(logits, self.name))
        skip, keep = logits.unbind(dim=3)
        return list((keep > skip).to(dtype).unbind(dim=1))


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
