"""Region selection (paper Sec. III-A.2, Eq. 2 and Eq. 8-9)."""
import weakref
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as torch_module
from mmcv.cnn import build_norm_layer
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import fold_conv_norm, weights_key

# Initial logits of {skip, keep}: keep wins by a wide margin, so that training
# starts with every region selected (paper: "initialized to select the whole
# feature maps"), as in the authors' model.
_INIT_SKIP_LOGIT = 1.0
_INIT_KEEP_LOGIT = 10.0


def straight_through_gumbel(keep_logit: Tensor, skip_logit: Tensor, tau: float,
                            generator: Optional[torch.Generator] = None,
                            noise_scale: float = 1.0) -> Tensor:
    """Hard binary Gumbel-softmax sample with straight-through gradients.

    Forward: ``1[keep_logit + g1 > skip_logit + g0]`` with i.i.d. Gumbel
    noise (Eq. 8). Backward: the gradient of the relaxed two-way softmax at
    temperature ``tau`` (Eq. 9). Sampling runs in float32 so that the noise
    ``-log(-log(u))`` stays finite under autocast.

    ``noise_scale`` multiplies the noise (1: the paper; 0: the deterministic
    inference decision, still with the relaxed gradient); see
    :class:`~sar_backbones.engine.SARGumbelNoiseHook`.
    """
    keep_logit, skip_logit = keep_logit.float(), skip_logit.float()
    margin = keep_logit - skip_logit
    if noise_scale > 0:
        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.rand((2, ) + keep_logit.shape, device=keep_logit.device,
                             generator=generator).clamp_(tiny, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        margin = margin + noise_scale * (gumbel[1] - gumbel[0])
    # softmax over {skip, keep} of the keep entry == sigmoid of the difference.
    soft_keep = torch.sigmoid(margin / tau)
    return _BinarizeStraightThrough.apply(soft_keep)


class _BinarizeStraightThrough(torch.autograd.Function):
    """``1[p > 0.5]`` forward, identity backward: exact 0/1 values, the soft gradient."""

    @staticmethod
    def forward(ctx, soft: Tensor) -> Tensor:
        hard = (soft > 0.5).to(soft.dtype)
        # NaN would binarise to 0 ("skip") and hide a diverged selector from the
        # rate loss's finiteness check; let it through instead.
        return torch.where(torch.isnan(soft), soft, hard)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class RegionSelector(nn.Module):
    """Predicts which patches of each channel group the refine block processes.

    ``logits = W_1x1 * AvgPool_K(ReLU(BN(W_3x3 * x_base)))`` (Eq. 2) with all
    convolutions grouped by ``G`` so that each group decides for itself.

    Args:
        in_channels (int): Channels of the base-branch feature ``C/alpha``.
        groups (int): Number of channel groups ``G`` of the refine branch.
        norm_cfg (dict): Norm layer config.
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
        self.norm = build_norm_layer(norm_cfg, hidden)[1]
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Conv2d(hidden, 2 * groups, 1, groups=groups, bias=True)
        # Scale of the Gumbel noise in training (1: the paper's sampling).
        self.noise_scale = 1.0
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
            return straight_through_gumbel(keep, skip, tau, noise_scale=self.noise_scale)
        return (keep > skip).to(x.dtype)


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
        stacked_bytes = sum(feature.numel() * feature.element_size() for feature in features)
        if stacked_bytes <= _STACK_MAX_BYTES and self.can_stack():
            return self._stacked_forward(features, grid)
        return [selector(feature, grid, tau) for selector, feature in zip(self, features)]

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
        skip, keep = logits.view(x.shape[0], len(self), groups_per_selector, 2,
                                 *grid).unbind(dim=3)
        return list((keep > skip).to(dtype).unbind(dim=1))
