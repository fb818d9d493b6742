"""SAR-ResNet: ResNet with Spatially Adaptive feature Refinement (Han et al., TIP 2021)."""
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from sar_backbones.registry import MODELS
from ..layers import BasicBlock, Bottleneck, RegionSelector, ResidualBlock
from .checkpoint import load_pretrained
from .sar_stage import SARStage

IntOrTriple = Union[int, Sequence[int]]


def _per_stage(value: Optional[IntOrTriple], name: str) -> Tuple[Optional[int], ...]:
    """Broadcast a per-SAR-stage option to the three replaced stages."""
    if value is None or isinstance(value, int):
        return (value, ) * 3
    value = tuple(value)
    if len(value) != 3:
        raise ValueError(f'{name} needs one value per SAR stage (3), got {value}')
    return value


@MODELS.register_module()
class SARResNet(BaseModule):
    """SAR-ResNet backbone (variants ``G{groups}s{base_stride}a{alpha}b{beta}``, target rate ``t``).

    The first three ResNet stages are replaced by SAR modules (see
    :class:`SARStage`): a cheap base branch at ``1/s`` resolution and
    ``C/alpha`` width decides, per channel group and patch, where the grouped
    full-resolution refine branch runs; the two are fused with learned channel
    weights. Stage 4 is a plain ResNet stage. Outputs keep ResNet's strides
    (4/8/16/32) and widths, so the backbone drops into any mmdet/mmseg config.

    Training samples the patch masks with a straight-through Gumbel-softmax at
    temperature ``tau`` and adds the activation-rate loss
    (:meth:`get_aux_losses`). Evaluation uses deterministic masks and, by
    default, a sparse path that convolves only the selected patches and
    computes exactly what the dense masked path computes (it runs when
    gradients are disabled, as in every OpenMMLab val/test loop).

    Args:
        depth (int): 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        in_channels (int): Input image channels. Defaults to 3.
        stem_channels (int): Stem width. Defaults to 64.
        base_channels (int): Width of stage 1 before block expansion. Defaults to 64.
        groups (int): ``G``, channel groups of the refine branch, each with its
            own mask. Defaults to 2.
        base_stride (int | Sequence[int]): ``s``, resolution reduction of the
            base branch, 2 or 4. An int applies to stages 1-2; stage 3 uses 2
            as in the authors' model. Defaults to 2.
        alpha (int): ``alpha``, base branch width ``C/alpha``. Defaults to 2.
        beta (float): ``beta``, refine branch width ``beta*C``. Defaults to 1.
        patch_grid (int | Sequence[int], optional): ``K`` per SAR stage: masks
            are ``K x K`` whatever the input size (the paper's setting).
            Defaults to (14, 7, 2): 4, 4 and 7-pixel patches at 224x224.
        patch_size (int | Sequence[int], optional): Fixed patch size in pixels
            per SAR stage instead of ``patch_grid`` (for detection-size
            inputs); e.g. (4, 4, 7). Give exactly one of the two.
        target_rate (float): ``t``, target activation rate in (0, 1]. Defaults to 0.5.
        rate_loss (str): ``'batch'`` (paper Eq. 10) or ``'sample'`` (Eq. 11).
        rate_loss_weight (float): ``lambda`` of ``L = L_task + lambda * L_refine``.
        temperature (float): Initial Gumbel-softmax temperature ``tau``.
        strides (Sequence[int]): Stride of each stage (ResNet semantics). Defaults to (1, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        out_indices (Sequence[int]): Stages to output. Defaults to (0, 1, 2, 3).
        deep_stem (bool): Three 3x3 convs instead of the 7x7 stem (ResNetV1c).
        contract_dilation (bool): Halve the dilation of the first block of a dilated stage.
        frozen_stages (int): Stages to freeze (-1: none, 0: stem only).
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config. Defaults to ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Keep norm layers in eval mode during training.
        zero_init_residual (bool): Zero the last norm of the non-refine blocks.
        inference_mode (str): ``'sparse'`` (default) or ``'dense'`` in eval mode.
        pretrained (str, optional): Deprecated, use ``init_cfg``.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained', checkpoint=...,
            prefix='backbone.')``; any mismatch with the architecture is an error.

    Example:
        >>> import torch
        >>> from sar_backbones.models import SARResNet
        >>> model = SARResNet(depth=50, groups=2, base_stride=2, alpha=2, beta=1,
        ...                   patch_grid=(14, 7, 2), target_rate=0.5).eval()
        >>> outs = model(torch.rand(1, 3, 224, 224))
        >>> [tuple(o.shape) for o in outs]
        [(1, 256, 56, 56), (1, 512, 28, 28), (1, 1024, 14, 14), (1, 2048, 7, 7)]
        >>> model.get_activation_rates().shape  # (batch, masked blocks)
        torch.Size([1, 10])
    """

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
    }
    num_sar_stages = 3

    def __init__(self,
                 depth: int,
                 in_channels: int = 3,
                 stem_channels: int = 64,
                 base_channels: int = 64,
                 groups: int = 2,
                 base_stride: IntOrTriple = 2,
                 alpha: int = 2,
                 beta: float = 1,
                 patch_grid: Optional[IntOrTriple] = (14, 7, 2),
                 patch_size: Optional[IntOrTriple] = None,
                 target_rate: float = 0.5,
                 rate_loss: str = 'batch',
                 rate_loss_weight: float = 1.0,
                 temperature: float = 1.0,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 deep_stem: bool = False,
                 contract_dilation: bool = False,
                 frozen_stages: int = -1,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 norm_eval: bool = False,
                 zero_init_residual: bool = True,
                 inference_mode: str = 'sparse',
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('init_cfg and pretrained cannot be set at the same time')
            warnings.warn('SARResNet: `pretrained` is deprecated, use '
                          "init_cfg=dict(type='Pretrained', checkpoint=...)", DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        if depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth} for SARResNet; choose from '
                           f'{sorted(self.arch_settings)}')
        self.depth = depth
        self.in_channels = in_channels
        block, stage_blocks = self.arch_settings[depth]
        self.stage_channels = tuple(base_channels * 2**i * block.expansion for i in range(4))
        if patch_grid is not None and patch_size is not None:
            raise ValueError('give either patch_grid (K per stage) or patch_size, not both')
        if patch_grid is None and patch_size is None:
            raise ValueError('one of patch_grid or patch_size must be set')
        base_strides = _per_stage(base_stride, 'base_stride')
        if isinstance(base_stride, int):
            base_strides = (base_stride, base_stride, 2)
        patch_grids = _per_stage(patch_grid, 'patch_grid')
        patch_sizes = _per_stage(patch_size, 'patch_size')
        _check_arguments(
            block=block, stage_channels=self.stage_channels, stem_channels=stem_channels,
            groups=groups, base_strides=base_strides, alpha=alpha, beta=beta,
            patch_grids=patch_grids, patch_sizes=patch_sizes, target_rate=target_rate,
            rate_loss=rate_loss, rate_loss_weight=rate_loss_weight, temperature=temperature,
            strides=strides, dilations=dilations, out_indices=out_indices,
            inference_mode=inference_mode, norm_cfg=norm_cfg, frozen_stages=frozen_stages)

        self.groups = groups
        self.base_strides = base_strides
        self.alpha = alpha
        self.beta = beta
        self.patch_grid = patch_grids if patch_grid is not None else None
        self.patch_size = patch_sizes if patch_size is not None else None
        self.rate_loss = rate_loss
        self.rate_loss_weight = rate_loss_weight
        self._target_rate = float(target_rate)
        self._temperature = float(temperature)
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.out_indices = tuple(out_indices)
        self.deep_stem = deep_stem
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.inference_mode = inference_mode
        self._mask_override: Optional[Tuple[float, int]] = None
        self._override_masks: Dict[Tuple[int, torch.Size], Tensor] = {}
        self._masks: List[Tensor] = []

        self._make_stem(in_channels, stem_channels, conv_cfg, norm_cfg)
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)

        def first_dilation(stage: int) -> int:
            d = dilations[stage]
            return d // 2 if contract_dilation and d > 1 else d

        in_width = stem_channels
        for i in range(self.num_sar_stages):
            stage = SARStage(
                block, in_width, self.stage_channels[i], stage_blocks[i], groups=groups,
                base_stride=base_strides[i], alpha=alpha, beta=beta,
                patch_grid=patch_grids[i], patch_size=patch_sizes[i], dilation=dilations[i],
                entry_stride=None if i == 0 else strides[i], entry_dilation=first_dilation(i),
                exit_block=i == self.num_sar_stages - 1, **common)
            self.add_module(f'layer{i + 1}', stage)
            in_width = self.stage_channels[i]
        last = [block(in_width, self.stage_channels[3], stride=strides[3],
                      dilation=first_dilation(3), **common)]
        last += [block(self.stage_channels[3], self.stage_channels[3], dilation=dilations[3],
                       **common) for _ in range(1, stage_blocks[3])]
        self.layer4 = nn.Sequential(*last)
        self._reset_parameters(zero_init_residual)
        self._freeze_stages()

    # ------------------------------------------------------------------ build
    def _make_stem(self, in_channels: int, stem_channels: int, conv_cfg: Optional[dict],
                   norm_cfg: dict) -> None:
        if self.deep_stem:
            half = stem_channels // 2
            layers: List[nn.Module] = []
            for cin, cout, stride in ((in_channels, half, 2), (half, half, 1),
                                      (half, stem_channels, 1)):
                layers += [build_conv_layer(conv_cfg, cin, cout, 3, stride=stride, padding=1,
                                            bias=False),
                           build_norm_layer(norm_cfg, cout)[1], nn.ReLU(inplace=True)]
            self.stem = nn.Sequential(*layers)
        else:
            self.conv1 = build_conv_layer(conv_cfg, in_channels, stem_channels, 7, stride=2,
                                          padding=3, bias=False)
            self.bn1 = build_norm_layer(norm_cfg, stem_channels)[1]
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _reset_parameters(self, zero_init_residual: bool) -> None:
        """The authors' initialisation: Kaiming-normal convs, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, RegionSelector):
                module.reset_parameters()
        if zero_init_residual:
            refine = {id(b) for stage in self.sar_stages for b in stage.refine_blocks}
            for module in self.modules():
                if isinstance(module, ResidualBlock) and id(module) not in refine:
                    nn.init.zeros_(module.last_norm.weight)

    def init_weights(self) -> None:
        """Initialise, or load ``init_cfg=dict(type='Pretrained', ...)`` strictly."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'),
                            map_location=cfg.get('map_location', 'cpu'))
            self._is_init = True
        else:
            super().init_weights()

    # --------------------------------------------------------------- stages
    @property
    def sar_stages(self) -> List[SARStage]:
        return [getattr(self, f'layer{i + 1}') for i in range(self.num_sar_stages)]

    @property
    def num_masked_blocks(self) -> int:
        return sum(stage.num_masked_blocks for stage in self.sar_stages)

    def _stem_modules(self) -> List[nn.Module]:
        return [self.stem] if self.deep_stem else [self.conv1, self.bn1]

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = self._stem_modules() + [getattr(self, f'layer{i}')
                                         for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'SARResNet':
        """Keep frozen stages and (with ``norm_eval``) norm layers in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # ------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f'SARResNet expects a 4-D (N, C, H, W) tensor, got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'SARResNet expects {self.in_channels} input channels '
                             f'(in_channels={self.in_channels}), got {x.shape[1]} '
                             f'in an input of shape {tuple(x.shape)}')
        stem_dtype = (self.stem[0] if self.deep_stem else self.conv1).weight.dtype
        if not x.is_floating_point() or (x.dtype != stem_dtype
                                         and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f'SARResNet expects a floating-point input of the dtype of its '
                            f'stem weights ({stem_dtype}) or autocast, got {x.dtype}; normalise '
                            'images with a data preprocessor first')
        if self.patch_grid is not None:
            # SAR stage i works at stride 4 * strides[1] * ... * strides[i] (ceil rounding).
            height, width = x.shape[-2:]
            stride, need, too_small = 4, 1, None
            for index, grid in enumerate(self.patch_grid):
                stride *= self.strides[index]
                need = max(need, (grid - 1) * stride + 1)
                size = (math.ceil(height / stride), math.ceil(width / stride))
                if too_small is None and min(size) < grid:
                    too_small = (index + 1, size, stride, grid)
            if too_small is not None:
                stage, size, stride, grid = too_small
                raise ValueError(
                    f'input {height}x{width} is too small for SAR stage {stage}: its '
                    f'{size[0]}x{size[1]} feature map (stride {stride}) cannot hold a {grid}x{grid} '
                    f'patch grid (patch_grid={self.patch_grid}); feed at least {need}x{need} '
                    'pixels or use patch_size=... (a grid that follows the input size)')
        # NaN/inf input makes every mask logit NaN, and NaN binarises to 'skip':
        # the rate loss would be finite but meaningless. get_aux_losses reports it
        # (checked there to avoid a second device synchronisation).
        self._input_finite = torch.isfinite(x).all() if self.training else None

    def _stem_forward(self, x: Tensor) -> Tensor:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self._check_input(x)
        # The sparse path has no autograd support; with gradients enabled the
        # dense masked path computes the same function.
        sparse = (not self.training and self.inference_mode == 'sparse'
                  and not torch.is_grad_enabled())
        x = self._stem_forward(x)
        outs = []
        masks: List[Tensor] = []
        for i, stage in enumerate(self.sar_stages):
            x, stage_masks = stage(x, self._temperature, sparse=sparse,
                                   mask_override=self._override_fn(len(masks)))
            masks.extend(stage_masks)
            if i in self.out_indices:
                outs.append(x)
        x = self.layer4(x)
        if 3 in self.out_indices:
            outs.append(x)
        self._masks = masks
        return tuple(outs)

    # --------------------------------------------------- masks and rates
    def get_masks(self) -> List[Tensor]:
        """Patch masks ``(B, G, Kh, Kw)`` of every masked block from the last forward."""
        return list(self._masks)

    def get_activation_rates(self) -> Tensor:
        """Activation rates ``r_{b,n}`` (Eq. 7) of the last forward: ``(batch, blocks)``."""
        if not self._masks:
            raise RuntimeError('get_activation_rates() needs a forward pass first')
        return torch.stack([mask.flatten(1).float().mean(1) for mask in self._masks], dim=1)

    def stage_block_slices(self) -> List[slice]:
        """Which columns of :meth:`get_activation_rates` belong to each SAR stage."""
        slices, start = [], 0
        for stage in self.sar_stages:
            slices.append(slice(start, start + stage.num_masked_blocks))
            start += stage.num_masked_blocks
        return slices

    def rate_loss_value(self, rates: Tensor) -> Tensor:
        """``L_refine`` of Eq. 10 (batch target) or Eq. 11 (per-sample target), unweighted.

        Under DDP each rank forms the loss from its own batch: the gradient of
        Eq. 10 through an all-reduced mean would need a differentiable
        all-reduce, while DDP already averages the per-rank gradients.
        """
        if self.rate_loss == 'batch':
            return (rates.mean(dim=0) - self._target_rate).pow(2).mean()
        return (rates - self._target_rate).pow(2).mean()

    def get_aux_losses(self) -> Dict[str, Tensor]:
        """Activation-rate loss (training) and logged rates of the last forward.

        Returns ``loss_act_rate = lambda * L_refine`` in training only (keys
        containing ``loss`` are optimised by mmengine) and the detached mean
        rates ``act_rate`` and ``act_rate_stage{1,2,3}``.
        """
        rates = self.get_activation_rates()
        logs = {'act_rate': rates.mean().detach()}
        for index, cols in enumerate(self.stage_block_slices(), start=1):
            logs[f'act_rate_stage{index}'] = rates[:, cols].mean().detach()
        if self.training:
            loss = self.rate_loss_weight * self.rate_loss_value(rates)
            input_finite = getattr(self, '_input_finite', None)
            ok = torch.isfinite(loss) if input_finite is None else \
                torch.isfinite(loss) & input_finite
            if not ok:
                if input_finite is not None and not input_finite:
                    raise FloatingPointError(
                        'the input of the last training forward contains NaN or inf, so every '
                        'region mask was sampled from NaN logits and the activation-rate loss '
                        f'({loss.item()}) is meaningless; check the data pipeline and the loss scale')
                raise FloatingPointError(
                    f'the activation-rate loss is {loss.item()} (rates finite: '
                    f'{bool(torch.isfinite(rates).all())}); check the input and the learning rate')
            logs['loss_act_rate'] = loss
        return logs

    # ------------------------------------------------------------ settings
    @property
    def temperature(self) -> float:
        return self._temperature

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel-softmax temperature ``tau`` (> 0)."""
        if not tau > 0:
            raise ValueError(f'temperature must be > 0, got {tau}')
        self._temperature = float(tau)

    @property
    def noise_scale(self) -> float:
        return self.sar_stages[0].selectors[0].noise_scale

    def set_noise_scale(self, scale: float) -> None:
        """Scale the Gumbel noise of training-mode mask sampling (>= 0; 1 = the paper).

        At 0 training uses the deterministic masks of inference (still with the
        relaxed straight-through gradient); short schedules anneal towards it
        so that the inference rate ends at the trained rate
        (:class:`~sar_backbones.engine.SARGumbelNoiseHook`).
        """
        if not scale >= 0:
            raise ValueError(f'noise scale must be >= 0, got {scale}')
        for module in self.modules():
            if isinstance(module, RegionSelector):
                module.noise_scale = float(scale)

    @property
    def target_rate(self) -> float:
        return self._target_rate

    def set_target_rate(self, target: float) -> None:
        """Set the target activation rate ``t`` in (0, 1]."""
        _check_target_rate(target)
        self._target_rate = float(target)

    def set_inference_mode(self, mode: str) -> None:
        """``'sparse'`` (gather-conv-scatter) or ``'dense'`` (masked) evaluation."""
        if mode not in ('sparse', 'dense'):
            raise ValueError(f"inference_mode must be 'sparse' or 'dense', got {mode!r}")
        self.inference_mode = mode

    def set_mask_override(self, rate: Optional[float], seed: int = 0) -> None:
        """Replace every learned mask by random patches at ``rate`` (None restores).

        Each image and group gets exactly ``round(rate * Kh * Kw)`` patches,
        drawn from a generator seeded by ``seed`` and the block index, so that
        the same input gives the same masks. For latency sweeps and analysis.
        """
        if rate is not None and not 0 <= rate <= 1:
            raise ValueError(f'mask override rate must be in [0, 1], got {rate}')
        self._mask_override = None if rate is None else (float(rate), int(seed))
        self._override_masks = {}

    def _override_fn(self, block_offset: int):
        if self._mask_override is None:
            return None
        rate, seed = self._mask_override

        def override(mask: Tensor, index: int) -> Tensor:
            block = block_offset + index
            # The masks depend on the shape only: drawn once, so that latency
            # sweeps do not time the drawing.
            random_mask = self._override_masks.get((block, mask.shape))
            if random_mask is None:
                batch, groups, kh, kw = mask.shape
                generator = torch.Generator().manual_seed(seed * 1000 + block)
                scores = torch.rand(batch, groups, kh * kw, generator=generator)
                keep = scores.argsort(dim=-1)[..., :round(rate * kh * kw)]
                with torch.inference_mode(False):  # usable by autograd later
                    random_mask = torch.zeros(batch, groups, kh * kw).scatter_(-1, keep, 1.0)
                random_mask = random_mask.view(mask.shape)
                self._override_masks[(block, mask.shape)] = random_mask
            return random_mask.to(mask, copy=True)

        return override


def _check_target_rate(target: float) -> None:
    if not 0 < target <= 1:
        raise ValueError(f'target_rate must be in (0, 1], got {target}')


def _check_arguments(*, block, stage_channels, stem_channels, groups, base_strides, alpha, beta,
                     patch_grids, patch_sizes, target_rate, rate_loss, rate_loss_weight,
                     temperature, strides, dilations, out_indices, inference_mode,
                     norm_cfg, frozen_stages=-1) -> None:
    """Reject configurations that would build a wrong or broken model, naming the option."""
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f'groups (G) must be a positive int, got {groups!r}')
    for s in base_strides:
        if s not in (2, 4):
            raise ValueError(f'base_stride (s) must be 2 or 4, got {base_strides}')
    if not isinstance(alpha, int) or alpha < 1:
        raise ValueError(f'alpha must be a positive int (base width C/alpha), got {alpha!r}')
    if not beta > 0:
        raise ValueError(f'beta must be > 0 (refine width beta*C), got {beta!r}')
    for name, values in (('patch_grid', patch_grids), ('patch_size', patch_sizes)):
        for v in values:
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f'{name} must hold positive ints, got {values}')
    _check_target_rate(target_rate)
    if rate_loss not in ('batch', 'sample'):
        raise ValueError(f"rate_loss must be 'batch' (Eq. 10) or 'sample' (Eq. 11), got {rate_loss!r}")
    if not (math.isfinite(rate_loss_weight) and rate_loss_weight >= 0):
        raise ValueError(f'rate_loss_weight (lambda) must be a finite number >= 0, '
                         f'got {rate_loss_weight}')
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    if frozen_stages not in range(-1, 5):
        raise ValueError(f'frozen_stages must be -1 (none), 0 (stem) or 1..4 (stem and the '
                         f'first stages), got {frozen_stages!r}')
    if inference_mode not in ('sparse', 'dense'):
        raise ValueError(f"inference_mode must be 'sparse' or 'dense', got {inference_mode!r}")
    if inference_mode == 'sparse' and 'BN' not in norm_cfg.get('type', ''):
        raise ValueError(f"inference_mode='sparse' folds BatchNorm into the convolutions; "
                         f"norm_cfg type {norm_cfg.get('type')!r} needs inference_mode='dense'")
    if len(strides) != 4 or len(dilations) != 4:
        raise ValueError(f'strides and dilations need 4 values (one per stage), got '
                         f'strides={tuple(strides)}, dilations={tuple(dilations)}')
    if strides[0] != 1:
        raise ValueError(f'strides[0] must be 1: stage 1 works at the stem resolution, '
                         f'got strides={tuple(strides)}')
    for i, (s, d) in enumerate(zip(strides, dilations)):
        if s not in (1, 2) or d < 1:
            raise ValueError(f'stage {i + 1}: stride must be 1 or 2 and dilation >= 1, got '
                             f'strides={tuple(strides)}, dilations={tuple(dilations)}')
        if s > 1 and d > 1:
            raise ValueError(
                f'stage {i + 1} both strides and dilates (strides={tuple(strides)}, '
                f'dilations={tuple(dilations)}); for output stride 8 use strides=(1, 2, 1, 1) '
                'and dilations=(1, 1, 2, 4)')
    if not out_indices or any(i not in range(4) for i in out_indices) or \
            len(set(out_indices)) != len(out_indices):
        raise ValueError(f'out_indices must be distinct stage indices in 0..3, got {tuple(out_indices)}')
    bottleneck = block is Bottleneck
    for i, width in enumerate(stage_channels[:3]):
        in_width = stem_channels if i == 0 else stage_channels[i - 1]
        refine_width = width * beta
        widths = {'input width': in_width, 'base width C/alpha': width / alpha,
                  'refine width beta*C': refine_width}
        if bottleneck:
            widths['refine bottleneck width beta*C/4'] = refine_width / 4
        for label, value in widths.items():
            if value != int(value) or int(value) % groups:
                raise ValueError(
                    f'groups (G={groups}) must divide every channel count of SAR stage {i + 1}, '
                    f'but its {label} is {value} (C={width}, alpha={alpha}, beta={beta})')
