"""The SAR API shared by every SAR backbone (SAR-ResNet, SAR-ResNeXt, SAR-MobileNetV2).

:class:`SARBackboneMixin` holds what does not depend on the network built:
the record of the last forward (masks, rates), the activation-rate losses
(paper Eq. 10 / 11), the settings that hooks and analysis tools change
(temperature ``tau``, target rate ``t``, Gumbel noise scale, inference mode,
mask override, :meth:`~SARBackboneMixin.temporary_settings`) and the
deployed / frozen-stage behaviour of ``train()``.

A backbone using it calls :meth:`SARBackboneMixin._init_sar_state` in its
``__init__`` and sets ``conv_cfg``, ``norm_cfg``, ``norm_eval`` and
``out_indices``; it defines ``sar_stages`` (modules with
``num_masked_blocks``), ``_freeze_stages()`` and a forward that records a
:class:`ForwardRecord`.
"""
import contextlib
from collections import OrderedDict
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import RegionSelector
from ..layers.gumbel import check_temperature, deterministic_straight_through
from .arguments import (InvalidArgumentError, check_conv_cfg, check_norm_cfg, check_rate_options,
                        check_target_rate)
from .mask_override import random_patch_masks

# Random override masks kept per (rate, seed, block, shape); small tensors,
# bounded so that a data set of many image sizes cannot grow it forever.
_MAX_OVERRIDE_MASKS = 256
_UNCHANGED = object()


class ForwardRecord(NamedTuple):
    """What one forward of the backbone decided, assigned in one step.

    Attributes:
        masks: Patch masks ``(B, G, Kh, Kw)`` of every masked block, in order.
        input_finite: Whether a training input was finite (a 0-dim bool
            tensor, checked lazily by :meth:`SARResNet.get_aux_losses` to
            avoid a device synchronisation); None in evaluation.
        margins: Noise-free logit margins ``keep - skip`` ``(B, G, Kh, Kw)``
            of every masked block in training (float32, with their graph),
            for the deterministic-rate loss; empty in evaluation.
    """
    masks: Tuple[Tensor, ...]
    input_finite: Optional[Tensor] = None
    margins: Tuple[Tensor, ...] = ()


class SARBackboneMixin:
    """Masks, rates, rate losses and settings of a SAR backbone (see the module docstring)."""

    def _init_sar_state(self, *, mask_groups: int, rate_loss: str, rate_loss_weight: float,
                        deterministic_rate_weight: float, deterministic_rate_tau: float,
                        target_rate: float, temperature: float, inference_mode: str) -> None:
        """Set the SAR state every backbone shares (options already checked by the caller).

        Args:
            mask_groups (int): ``G``.
            rate_loss (str): ``'batch'`` (Eq. 10) or ``'sample'`` (Eq. 11).
            rate_loss_weight (float): ``lambda``.
            deterministic_rate_weight (float): ``lambda_det`` of the noise-free rate term (ours).
            deterministic_rate_tau (float): Temperature of that term's relaxed gradient.
            target_rate (float): ``t``.
            temperature (float): Initial Gumbel temperature ``tau``.
            inference_mode (str): ``'sparse'`` or ``'dense'``.
        """
        self.mask_groups = mask_groups
        self.rate_loss = rate_loss
        self.rate_loss_weight = rate_loss_weight
        self.deterministic_rate_weight, self.deterministic_rate_tau = check_rate_options(
            deterministic_rate_weight=deterministic_rate_weight,
            deterministic_rate_tau=deterministic_rate_tau)
        self._target_rate = float(target_rate)
        self._temperature = float(temperature)
        self.inference_mode = inference_mode
        self._mask_override: Optional[Tuple[float, int]] = None
        self._override_masks: 'OrderedDict[tuple, Tensor]' = OrderedDict()
        self._record = ForwardRecord(masks=())
        self._deployed = False

    def _check_image_batch(self, x: Tensor, stem_weight: Tensor) -> None:
        """What no SAR backbone can take, named: not ``(N, C, H, W)``, other channels, not
        floating point (or not the stem's dtype outside autocast), an empty training batch."""
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f'{name} expects a 4-D (N, C, H, W) tensor, got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{name} expects {self.in_channels} input channels '
                             f'(in_channels={self.in_channels}), got {x.shape[1]} '
                             f'in an input of shape {tuple(x.shape)}')
        if not x.is_floating_point() or (x.dtype != stem_weight.dtype
                                         and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f'{name} expects a floating-point input of the dtype of its '
                            f'stem weights ({stem_weight.dtype}) or autocast, got {x.dtype}; '
                            'normalise images with a data preprocessor first')
        if self.training and x.shape[0] == 0:
            raise ValueError(f'{name} got a training batch of 0 images: the activation rates '
                             'and their loss are undefined; check the data loader and sampler')

    @staticmethod
    def _freeze(modules: Sequence[torch.nn.Module]) -> None:
        """Eval mode and no gradients for ``modules`` (``frozen_stages``)."""
        for module in modules:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    @property
    def num_masked_blocks(self) -> int:
        return sum(stage.num_masked_blocks for stage in self.sar_stages)

    def train(self, mode: bool = True) -> 'SARBackboneMixin':
        """Keep frozen stages and (with ``norm_eval``) norm layers in eval mode."""
        if mode and self._deployed:
            raise RuntimeError(f'this {type(self).__name__} was deployed (switch_to_deploy(): '
                               'BatchNorm folded, '
                               'weights laid out for inference) and cannot train; build the model '
                               'again or reload its checkpoint to train it')
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def _take_margins(self, num_masks: int) -> Tuple[Tensor, ...]:
        """The noise-free margins of this training forward, taken from the selectors.

        Each selector keeps the margin of its last training forward; they
        are moved into the record (and cleared there) so that only the
        record holds graph tensors between forwards.
        """
        margins = []
        for module in self.modules():
            if isinstance(module, RegionSelector):
                if module.last_margin is not None:
                    margins.append(module.last_margin)
                module.last_margin = None
        # Evaluation (no margins) or a selector that did not run: no record.
        return tuple(margins) if self.training and len(margins) == num_masks else ()

    @property
    def last_forward(self) -> ForwardRecord:
        """The :class:`ForwardRecord` of the last forward (masks, input check)."""
        return self._record

    def get_masks(self) -> List[Tensor]:
        """Patch masks ``(B, G, Kh, Kw)`` of every masked block from the last forward."""
        return list(self._record.masks)

    def get_activation_rates(self) -> Tensor:
        """Activation rates ``r_{b,n}`` (Eq. 7) of the last forward: ``(batch, blocks)``."""
        masks = self._record.masks
        if not masks:
            raise RuntimeError('get_activation_rates() needs a forward pass first')
        return torch.stack([mask.flatten(1).float().mean(1) for mask in masks], dim=1)

    def stage_block_slices(self) -> List[slice]:
        """Which columns of :meth:`get_activation_rates` belong to each SAR stage."""
        slices, start = [], 0
        for stage in self.sar_stages:
            slices.append(slice(start, start + stage.num_masked_blocks))
            start += stage.num_masked_blocks
        return slices

    def rate_loss_value(self, rates: Tensor) -> Tensor:
        """``L_refine`` of Eq. 10 (batch target) or Eq. 11 (per-sample target), unweighted.

        ``rates`` is ``(B, N)``: ``r_{b,n}`` per sample ``b`` and masked block
        ``n``. Eq. 10: ``1/N sum_n (1/B sum_b r_{b,n} - t)^2``, each block
        held to ``t`` on its own. Eq. 11: ``1/N sum_n 1/B sum_b (r_{b,n} - t)^2``.

        Under DDP each rank forms the loss from its own batch: the gradient of
        Eq. 10 through an all-reduced mean would need a differentiable
        all-reduce, while DDP already averages the per-rank gradients.
        """
        if self.rate_loss == 'batch':
            return (rates.mean(dim=0) - self._target_rate).pow(2).mean()
        return (rates - self._target_rate).pow(2).mean()

    def get_deterministic_rates(self) -> Tensor:
        """Rates ``(B, N)`` of the noise-free decisions of the last training forward.

        Forward: the share of patches with ``keep > skip`` (what inference
        would select with this forward's normalisation statistics); backward:
        the gradient of ``sigmoid((keep - skip) / deterministic_rate_tau)``
        (:func:`deterministic_straight_through`). Ours, not the paper's.
        """
        margins = self._record.margins
        if not margins:
            raise RuntimeError('get_deterministic_rates() needs a training forward first')
        tau = self.deterministic_rate_tau
        return torch.stack([deterministic_straight_through(m, tau).flatten(1).mean(1)
                            for m in margins], dim=1)

    def get_aux_losses(self) -> Dict[str, Tensor]:
        """Activation-rate loss (training) and logged rates of the last forward.

        Returns ``loss_act_rate = lambda * L_refine`` in training only (keys
        containing ``loss`` are optimised by mmengine) and the detached mean
        rates ``act_rate`` and ``act_rate_stage{1,2,3}``. In training also
        ``act_rate_det`` / ``act_rate_det_stage{i}``, the rates of the
        noise-free decisions (what inference would select), and, with
        ``deterministic_rate_weight > 0``, ``loss_act_rate_det = lambda_det *
        L_refine_det`` (ours, see the class docstring).
        """
        rates = self.get_activation_rates()
        slices = self.stage_block_slices()
        logs = {'act_rate': rates.mean().detach()}
        for index, cols in enumerate(slices, start=1):
            logs[f'act_rate_stage{index}'] = rates[:, cols].mean().detach()
        margins = self._record.margins if self.training else ()
        if margins:
            det_rates = self.get_deterministic_rates()
            logs['act_rate_det'] = det_rates.mean().detach()
            for index, cols in enumerate(slices, start=1):
                logs[f'act_rate_det_stage{index}'] = det_rates[:, cols].mean().detach()
            if self.deterministic_rate_weight > 0:
                logs['loss_act_rate_det'] = \
                    self.deterministic_rate_weight * self.rate_loss_value(det_rates)
        if self.training:
            loss = self.rate_loss_weight * self.rate_loss_value(rates)
            # One finiteness check for both terms (NaN margins make both NaN).
            loss_check = loss + logs['loss_act_rate_det'].detach() \
                if 'loss_act_rate_det' in logs else loss
            input_finite = self._record.input_finite
            ok = torch.isfinite(loss_check) if input_finite is None else \
                torch.isfinite(loss_check) & input_finite
            if not ok:
                if input_finite is not None and not input_finite:
                    raise FloatingPointError(
                        'the input of the last training forward contains NaN or inf, so every '
                        'region mask was sampled from NaN logits and the activation-rate loss '
                        f'({loss.item()}) is meaningless; check the data pipeline and the loss '
                        'scale')
                raise FloatingPointError(
                    f'the activation-rate loss is {loss.item()} (rates finite: '
                    f'{bool(torch.isfinite(rates).all())}); check the input and the learning rate')
            logs['loss_act_rate'] = loss
        return logs

    @property
    def groups(self) -> int:
        """Deprecated alias of :attr:`mask_groups` (``G``)."""
        return self.mask_groups

    @property
    def temperature(self) -> float:
        return self._temperature

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel-softmax temperature ``tau`` (in [1e-4, 1e4])."""
        if isinstance(tau, (int, float)) and not tau > 0:
            raise InvalidArgumentError(f'temperature must be > 0, got {tau!r}')
        self._temperature = check_temperature(tau)

    @property
    def noise_scale(self) -> float:
        """Scale of the training-mode Gumbel noise (0 once deployed: inference only)."""
        selector = next((m for m in self.modules() if isinstance(m, RegionSelector)), None)
        return 0.0 if selector is None else selector.noise_scale

    def set_noise_scale(self, scale: float) -> None:
        """Scale the Gumbel noise of training-mode mask sampling (in [0, 1]; 1 = the paper).

        At 0 training uses the deterministic masks of inference (still with the
        relaxed straight-through gradient); short schedules anneal towards it
        so that the inference rate ends at the trained rate
        (:class:`~sar_backbones.engine.SARGumbelNoiseHook`).
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not 0 <= scale <= 1:
            raise InvalidArgumentError(f'noise scale must be a number in [0, 1], got {scale!r}')
        for module in self.modules():
            if isinstance(module, RegionSelector):
                module.noise_scale = float(scale)

    @property
    def target_rate(self) -> float:
        return self._target_rate

    def set_target_rate(self, target: float) -> None:
        """Set the target activation rate ``t`` in (0, 1]."""
        self._target_rate = check_target_rate(target)

    def set_inference_mode(self, mode: str) -> None:
        """``'sparse'`` (gather-conv-scatter) or ``'dense'`` (masked) evaluation."""
        if mode not in ('sparse', 'dense'):
            raise InvalidArgumentError(
                f"inference_mode must be 'sparse' or 'dense', got {mode!r}")
        if mode == 'sparse':
            check_conv_cfg(self.conv_cfg, mode)
            check_norm_cfg(self.norm_cfg, self.mask_groups, mode)
        self.inference_mode = mode

    def set_mask_override(self, rate: Optional[float], seed: int = 0) -> None:
        """Replace every learned mask by random patches at ``rate`` (None restores).

        Each image and group gets exactly ``round(rate * Kh * Kw)`` patches,
        chosen by ``seed`` and the block index, so that the same input gives
        the same masks (:func:`random_patch_masks`). For latency sweeps and
        analysis; :meth:`temporary_settings` restores the previous state.
        """
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0 <= rate <= 1):
            raise InvalidArgumentError(f'mask override rate must be in [0, 1], got {rate!r} '
                                       '(a number, or None for the learned masks)')
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidArgumentError(f'mask override seed must be an int >= 0, got {seed!r}')
        self._mask_override = None if rate is None else (float(rate), seed)

    @contextlib.contextmanager
    def temporary_settings(self, *, training: Optional[bool] = None,
                           inference_mode: Optional[str] = None, mask_rate=_UNCHANGED,
                           seed: int = 0, out_indices: Optional[Sequence[int]] = None
                           ) -> Iterator['SARBackboneMixin']:
        """Change modes for a block of code; everything is as before on exit.

        Analysis code (complexity counts, rate measurements, mask pictures,
        benchmarks) runs the backbone in other modes than its owner left it
        in. On exit this restores, whatever happened inside: the training
        flag of every submodule, the inference mode, the mask override, the
        outputs and the record of the last forward (so that
        :meth:`get_masks` keeps describing the caller's forward).

        Args:
            training (bool, optional): ``train()`` / ``eval()`` inside.
            inference_mode (str, optional): ``'sparse'`` or ``'dense'`` inside.
            mask_rate (float | None, optional): Random masks at this rate
                inside (:meth:`set_mask_override`); None lifts an override;
                unchanged when not given.
            seed (int): Seed of the random masks.
            out_indices (Sequence[int], optional): Stages to output inside.

        Example:
            >>> with backbone.temporary_settings(training=False, mask_rate=1.0):
            ...     backbone(x)  # every patch refined
        """
        saved_flags = [(module, module.training) for module in self.modules()]
        saved = (self.inference_mode, self._mask_override, self._record, self.out_indices)
        try:
            if training is not None:
                self.train(training)
            if inference_mode is not None:
                self.set_inference_mode(inference_mode)
            if mask_rate is not _UNCHANGED:
                self.set_mask_override(mask_rate, seed=seed)
            if out_indices is not None:
                self.out_indices = tuple(out_indices)
            yield self
        finally:
            for module, flag in saved_flags:
                module.training = flag
            self.inference_mode, self._mask_override, self._record, self.out_indices = saved

    def _override_fn(self, block_offset: int):
        if self._mask_override is None:
            return None
        rate, seed = self._mask_override

        def override(mask: Tensor, index: int) -> Tensor:
            block = block_offset + index
            key = (rate, seed, block, tuple(mask.shape), mask.device, mask.dtype)
            if torch.compiler.is_compiling():
                # Traced into the graph (a few integer ops); no Python cache.
                return random_patch_masks(mask.shape, rate, seed, block, mask.device, mask.dtype)
            # The masks depend on the key only: drawn once, so that latency
            # sweeps do not time the drawing.
            random_mask = self._override_masks.get(key)
            if random_mask is None:
                with torch.inference_mode(False):  # usable by autograd later
                    random_mask = random_patch_masks(mask.shape, rate, seed, block, mask.device,
                                                     mask.dtype)
                self._override_masks[key] = random_mask
                if len(self._override_masks) > _MAX_OVERRIDE_MASKS:
                    self._override_masks.popitem(last=False)
            # A copy: a caller's edit of a returned mask must not leak into the next forward.
            return random_mask.clone()

        return override

    @property
    def deployed(self) -> bool:
        """Whether :meth:`switch_to_deploy` prepared this model for inference."""
        return self._deployed
