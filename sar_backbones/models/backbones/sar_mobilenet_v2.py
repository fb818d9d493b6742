"""SAR-MobileNetV2: MobileNetV2 with Spatially Adaptive feature Refinement (Han et al., 2021)."""
import math
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from sar_backbones.registry import MODELS
from ..layers import FusionGate, RegionSelector
from ..layers.blocks import folded_conv
from ..layers.gumbel import check_temperature
from ..layers.inverted_residual import InvertedResidual, activation_clamp
from ..layers.inverted_residual_stage import SARInvertedResidualStage
from .arguments import (InvalidArgumentError, check_conv_cfg, check_norm_cfg, check_target_rate,
                        per_stage, require_int, require_int_sequence)
from .checkpoint import (ArchitectureCheckedLoading, check_backbone_state_dict, extract_state_dict,
                         load_checkpoint_file)
from .sar_api import ForwardRecord, SARBackboneMixin

IntOrSeq = Union[int, Sequence[int]]

# Patch grid K per SAR layer (layers 2-5): 4, 4, 7 and 7-pixel patches at
# 224x224, the authors' mask sizes 14/7/2/2.
DEFAULT_PATCH_GRID = (14, 7, 2, 2)


def make_divisible(value: float, divisor: int = 8, min_ratio: float = 0.9) -> int:
    """Round a width to the nearest multiple of ``divisor``, never below ``min_ratio * value``.

    The rounding of MobileNetV2's widths (``widen_factor``) in mmpretrain and mmseg.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < min_ratio * value else rounded


@MODELS.register_module()
class SARMobileNetV2(SARBackboneMixin, ArchitectureCheckedLoading, BaseModule):
    """SAR-MobileNetV2 backbone (variants ``G{G}s{s}a{alpha}b{beta}``, target rate ``t``).

    mmpretrain / mmseg ``MobileNetV2`` (stem ``conv1``, seven layers of
    inverted residual blocks ``layer1``-``layer7``, mmpretrain's last 1x1 conv
    ``conv2``) whose high-resolution layers 2-5 (24/32/64/96 channels at
    ``widen_factor=1``, strides 4, 8, 16, 16) are SAR modules
    (:class:`~sar_backbones.models.layers.inverted_residual_stage.SARInvertedResidualStage`).
    For a layer of ``n`` blocks, expansion ``t``, width ``C``:

    * the first block (stride, width change) runs densely (the *entry*);
    * a base branch: 3x3/2 average pooling (twice for ``s=4``), then ``n-1``
      stride-1 inverted residual blocks of expansion ``t`` at ``1/s`` of the
      layer's resolution and width ``C/alpha``;
    * ``n-1`` region selectors (the project's :class:`RegionSelector`: grouped
      3x3 conv, pooling to the ``K x K`` grid, {skip, keep} logits per mask
      group, hard straight-through Gumbel-softmax at temperature ``tau`` in
      training, ``keep > skip`` at inference);
    * a refine branch of ``n-1`` inverted residual blocks at full resolution,
      width ``beta*C``, both 1x1 convs grouped by ``G`` and the depthwise 3x3
      grouped per channel, so every mask group keeps its own channels; the
      masks act on the block input and both hidden ReLU6 activations (as in
      SAR-ResNet), so the sparse path is exact;
    * linear 1x1 conv + BN alignments to ``C`` and the channel-gate fusion
      ``y = a * up(x_base) + (1 - a) * x_refine`` (Eq. 5) with no activation.

    Outputs keep MobileNetV2's widths and strides (and mmseg's OS8 option:
    ``strides=(1, 2, 2, 1, 1, 1, 1)``, ``dilations=(1, 1, 1, 2, 2, 4, 4)``),
    so the backbone drops into any config of MobileNetV2 (always as a tuple,
    as mmpretrain's; mmseg's returns a lone output bare). The SAR API is
    SAR-ResNet's (:meth:`get_aux_losses`, :meth:`set_inference_mode`,
    :meth:`set_mask_override`, :meth:`temporary_settings`, ...); its "SAR
    stages" 1-4 (``act_rate_stage1`` ... ``act_rate_stage4``) are layers 2-5.

    From the authors' SAR-MobileNetV2 (``yizenghan/sarNet``,
    ``models/mobilenet_v2_sar.py``): SAR in the 24/32/64/96-channel layers
    with mask grids 14/7/2/2, base blocks of the same expansion at half the
    refine resolution and ``C/alpha`` width, one selector per refine block
    fed by its base block, refine projection 1x1 grouped by ``G``, masks on
    the hidden activations, the channel-gate fusion without activation.
    Our choices, and why:

    * the authors' branches both have ``n`` blocks, the first refine block
      strided; here the first block is a dense entry (as SAR-ResNet's
      transitions) so that the refine blocks are stride-1 residual blocks
      that the sparse engine runs exactly (8 masked blocks instead of 12);
    * the authors' refine expansion 1x1 is dense and reads the unmasked
      input; here it is grouped by ``G`` and reads the masked input, the
      rule of SAR-ResNet's refine blocks, so its cost scales with the rate;
    * the alignments are linear 1x1 conv + BN (the authors': 3x3 conv + BN +
      ReLU6 for the base branch), keeping layer outputs linear;
    * the base branch pools before its first block (as the authors') and
      its blocks are all stride 1, so that no expansion 1x1 of the base
      branch runs at full resolution; ``s=4`` pools twice (layers 2-3;
      layers 4-5 use ``s=2``, as SAR-ResNet's stage 3); dilations follow
      mmseg (the first block of a layer only); ``conv2`` exists only when
      ``out_indices`` contains 7 (its weights are skipped when a checkpoint
      with them is loaded into a backbone without it).

    Args:
        widen_factor (float): Width multiplier. Defaults to 1.
        in_channels (int): Input image channels. Defaults to 3.
        mask_groups (int): ``G``, mask groups of the refine branch. Defaults to 2.
        base_stride (int | Sequence[int]): ``s``, 2 or 4; an int applies to
            layers 2-3 (layers 4-5 use 2), or one value per SAR layer. Defaults to 2.
        alpha (int): ``alpha``, base width ``C/alpha``. Defaults to 2.
        beta (float): ``beta``, refine width ``beta*C``. Defaults to 1.
        patch_grid (int | Sequence[int], optional): ``K`` per SAR layer.
            Defaults to (14, 7, 2, 2); a ``patch_size`` given alone replaces it.
        patch_size (int | Sequence[int], optional): Fixed patch size per SAR layer.
        target_rate (float): ``t`` in (0, 1]. Defaults to 0.5.
        rate_loss (str): ``'batch'`` (Eq. 10) or ``'sample'`` (Eq. 11).
        rate_loss_weight (float): ``lambda``. Defaults to 1.
        temperature (float): Initial Gumbel-softmax temperature ``tau``.
        deterministic_rate_weight (float): ``lambda_det`` of SAR-ResNet's
            optional rate loss on the noise-free decisions (ours, not the
            paper's; see :class:`SARResNet`). Defaults to 0.
        deterministic_rate_tau (float): Its relaxation temperature. Defaults to 1.
        strides (Sequence[int]): Stride of the first block of each of the 7
            layers (mmseg). Defaults to (1, 2, 2, 2, 1, 2, 1).
        dilations (Sequence[int]): Dilation of the first block of each layer.
        out_indices (Sequence[int]): Outputs in 0..7 (7: ``conv2``, mmpretrain).
            Defaults to (7, ).
        frozen_stages (int): -1 (none), 0 (stem) or 1..7 (stem and layers).
        conv_cfg (dict, optional): Conv layer config.
        norm_cfg (dict): Norm layer config. Defaults to ``dict(type='BN')``.
        act_cfg (dict): ``dict(type='ReLU6')`` (or ReLU).
        norm_eval (bool): Keep norm layers in eval mode during training.
        with_cp (bool): Gradient checkpointing (the Gumbel noise is replayed).
        inference_mode (str): ``'sparse'`` (default) or ``'dense'`` in eval mode.
        pretrained (str, optional): Deprecated, use ``init_cfg``.
        init_cfg (dict | list[dict], optional): Initialisation config;
            ``Pretrained`` loads strictly (``conv2`` aside, see above).

    Example:
        >>> model = SARMobileNetV2(out_indices=(1, 2, 4, 6)).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 224, 224))]
        [(1, 24, 56, 56), (1, 32, 28, 28), (1, 96, 14, 14), (1, 320, 7, 7)]
    """

    # (expand ratio t, channels, blocks) of the seven layers, as upstream.
    arch_settings = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
                     (6, 320, 1))
    sar_layers = (1, 2, 3, 4)  # layer2..layer5
    num_sar_stages = 4

    def __init__(self,
                 widen_factor: float = 1.0,
                 in_channels: int = 3,
                 mask_groups: int = 2,
                 base_stride: IntOrSeq = 2,
                 alpha: int = 2,
                 beta: float = 1,
                 patch_grid: Optional[IntOrSeq] = DEFAULT_PATCH_GRID,
                 patch_size: Optional[IntOrSeq] = None,
                 target_rate: float = 0.5,
                 rate_loss: str = 'batch',
                 rate_loss_weight: float = 1.0,
                 temperature: float = 1.0,
                 deterministic_rate_weight: float = 0.0,
                 deterministic_rate_tau: float = 1.0,
                 strides: Sequence[int] = (1, 2, 2, 2, 1, 2, 1),
                 dilations: Sequence[int] = (1, 1, 1, 1, 1, 1, 1),
                 out_indices: Sequence[int] = (7, ),
                 frozen_stages: int = -1,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU6'),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 inference_mode: str = 'sparse',
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        if pretrained is not None:
            if not isinstance(pretrained, str):
                raise InvalidArgumentError(f'pretrained must be a checkpoint path (str) or None, '
                                           f'got {pretrained!r}')
            if init_cfg is not None:
                raise InvalidArgumentError('init_cfg and pretrained cannot be set at the same time')
            warnings.warn('SARMobileNetV2: `pretrained` is deprecated, use '
                          "init_cfg=dict(type='Pretrained', checkpoint=...)", DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        options = self._check_options(
            widen_factor=widen_factor, in_channels=in_channels, mask_groups=mask_groups,
            base_stride=base_stride, alpha=alpha, beta=beta, patch_grid=patch_grid,
            patch_size=patch_size, target_rate=target_rate, rate_loss=rate_loss,
            rate_loss_weight=rate_loss_weight, temperature=temperature, strides=strides,
            dilations=dilations, out_indices=out_indices, frozen_stages=frozen_stages,
            conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg,
            inference_mode=inference_mode, with_cp=with_cp, norm_eval=norm_eval)
        self.widen_factor = float(widen_factor)
        self.in_channels = in_channels
        self._init_sar_state(
            mask_groups=mask_groups, rate_loss=rate_loss, rate_loss_weight=rate_loss_weight,
            deterministic_rate_weight=deterministic_rate_weight,
            deterministic_rate_tau=deterministic_rate_tau, target_rate=target_rate,
            temperature=temperature, inference_mode=inference_mode)
        self.base_strides = options['base_strides']
        self.alpha = alpha
        self.beta = beta
        self.patch_grid = options['patch_grids'] if patch_grid is not None else None
        self.patch_size = options['patch_sizes'] if patch_size is not None else None
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg

        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        width = options['stem_channels']
        self.conv1 = ConvModule(in_channels, width, 3, stride=2, padding=1, **common)
        self.layer_names: List[str] = []
        for index, (ratio, _, num_blocks) in enumerate(self.arch_settings):
            out_width = options['stage_channels'][index]
            if index in self.sar_layers:
                sar = self.sar_layers.index(index)
                layer: nn.Module = SARInvertedResidualStage(
                    width, out_width, num_blocks, ratio, strides[index], dilations[index],
                    mask_groups, self.base_strides[sar], alpha, beta,
                    patch_grid=options['patch_grids'][sar],
                    patch_size=options['patch_sizes'][sar], with_cp=with_cp, **common)
                layer.set_name(f'layer{index + 1}')
            else:
                # mmseg: stride and dilation apply to the first block only.
                layer = nn.Sequential(*(
                    InvertedResidual(width if i == 0 else out_width, out_width,
                                     strides[index] if i == 0 else 1, ratio,
                                     dilation=dilations[index] if i == 0 else 1,
                                     with_cp=with_cp, **common)
                    for i in range(num_blocks)))
            self.add_module(f'layer{index + 1}', layer)
            self.layer_names.append(f'layer{index + 1}')
            width = out_width
        if 7 in self.out_indices:
            self.conv2 = ConvModule(width, options['stage_channels'][7], 1, **common)
            self.layer_names.append('conv2')
        self.stage_channels = tuple(options['stage_channels'][:len(self.layer_names)])
        self._reset_parameters()
        self._freeze_stages()

    # ------------------------------------------------------------ options
    @classmethod
    def _check_options(cls, **kw) -> Dict[str, object]:
        """Reject configurations that would build a wrong model, naming the option."""
        wf = kw['widen_factor']
        if isinstance(wf, bool) or not isinstance(wf, (int, float)) or not (
                math.isfinite(wf) and wf > 0):
            raise InvalidArgumentError(f'widen_factor must be a number > 0, got {wf!r}')
        require_int(kw['in_channels'], 'in_channels', 1)
        groups = require_int(kw['mask_groups'], 'mask_groups (G)', 1)
        alpha = require_int(kw['alpha'], 'alpha', 1, accepts='a positive int (base width C/alpha)')
        beta = kw['beta']
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
                math.isfinite(beta) and beta > 0):
            raise InvalidArgumentError(f'beta must be a finite number > 0 (refine width beta*C), '
                                       f'got {beta!r}')
        base_stride = kw['base_stride']
        base_strides = per_stage(base_stride, 'base_stride', cls.num_sar_stages)
        if not isinstance(base_stride, Sequence):
            base_strides = (base_stride, base_stride, 2, 2)
        if any(s not in (2, 4) for s in base_strides):
            raise InvalidArgumentError(f'base_stride (s) must be 2 or 4, got {base_stride!r} (an '
                                       'int, or one int per SAR layer)')
        patch_grid, patch_size = kw['patch_grid'], kw['patch_size']
        if patch_size is not None and patch_grid is DEFAULT_PATCH_GRID:
            patch_grid = None
        if patch_grid is not None and patch_size is not None:
            raise InvalidArgumentError('give either patch_grid (K per SAR layer) or patch_size, '
                                       'not both')
        if patch_grid is None and patch_size is None:
            raise InvalidArgumentError('one of patch_grid or patch_size must be set')
        patch_grids = per_stage(patch_grid, 'patch_grid', cls.num_sar_stages)
        patch_sizes = per_stage(patch_size, 'patch_size', cls.num_sar_stages)
        for name, values in (('patch_grid', patch_grids), ('patch_size', patch_sizes)):
            if any(v is not None and v < 1 for v in values):
                raise InvalidArgumentError(f'{name} must hold positive ints, got {values}')
        check_target_rate(kw['target_rate'])
        if kw['rate_loss'] not in ('batch', 'sample'):
            raise InvalidArgumentError(f"rate_loss must be 'batch' (Eq. 10) or 'sample' (Eq. 11), "
                                       f"got {kw['rate_loss']!r}")
        weight = kw['rate_loss_weight']
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and weight >= 0):
            raise InvalidArgumentError(f'rate_loss_weight (lambda) must be a finite number >= 0, '
                                       f'got {weight!r}')
        check_temperature(kw['temperature'])
        num_layers = len(cls.arch_settings)
        strides = require_int_sequence(kw['strides'], 'strides', num_layers,
                                       accepts=f'{num_layers} ints (one per layer)')
        dilations = require_int_sequence(kw['dilations'], 'dilations', num_layers,
                                         accepts=f'{num_layers} ints (one per layer)')
        if any(s not in (1, 2) for s in strides) or any(d < 1 for d in dilations):
            raise InvalidArgumentError(f'strides must be 1 or 2 and dilations >= 1, got '
                                       f'strides={strides}, dilations={dilations}')
        indices = require_int_sequence(kw['out_indices'], 'out_indices',
                                       accepts='a sequence of distinct indices in 0..7')
        if not indices or any(i not in range(num_layers + 1) for i in indices) or \
                len(set(indices)) != len(indices):
            raise InvalidArgumentError(f'out_indices must be distinct indices in 0..7 (7: the '
                                       f'last 1x1 conv), got {kw["out_indices"]!r}')
        frozen = kw['frozen_stages']
        if isinstance(frozen, bool) or not isinstance(frozen, int) or \
                frozen not in range(-1, num_layers + 1):
            raise InvalidArgumentError(f'frozen_stages must be in range(-1, 8) (-1: none, 0: '
                                       f'stem), got {frozen!r}')
        if kw['inference_mode'] not in ('sparse', 'dense'):
            raise InvalidArgumentError(f"inference_mode must be 'sparse' or 'dense', got "
                                       f"{kw['inference_mode']!r}")
        activation_clamp(kw['act_cfg'])
        for flag in ('with_cp', 'norm_eval'):
            if not isinstance(kw[flag], bool):
                raise InvalidArgumentError(f'{flag} must be a bool, got {kw[flag]!r}')

        stem = make_divisible(32 * wf, 8)
        channels = [make_divisible(c * wf, 8) for _, c, _ in cls.arch_settings]
        channels.append(int(1280 * wf) if wf > 1.0 else 1280)
        widths = [('stem', stem)]
        in_width = stem
        for index, (ratio, _, num_blocks) in enumerate(cls.arch_settings):
            out = channels[index]
            widths += [(f'layer{index + 1}', out), (f'layer{index + 1} hidden',
                                                    int(round(in_width * ratio)))]
            if index in cls.sar_layers:
                hidden = int(round(out * ratio))
                labels = {'layer width C': out, 'base width C/alpha': out / alpha,
                          'refine width beta*C': out * beta,
                          'refine hidden width t*beta*C': round(out * beta * ratio)}
                for label, value in labels.items():
                    if value != int(value) or int(value) % groups or value < 1:
                        raise InvalidArgumentError(
                            f'mask_groups (G={groups}) must divide every channel count of SAR '
                            f'layer{index + 1}, but its {label} is {value} (C={out}, '
                            f'alpha={alpha}, beta={beta}, widen_factor={wf})')
                widths += [(f'layer{index + 1} {k}', v) for k, v in labels.items()]
                widths.append((f'layer{index + 1} hidden', hidden))
            in_width = out
        widths.append(('conv2', channels[7]))
        check_conv_cfg(kw['conv_cfg'], kw['inference_mode'])
        check_norm_cfg(kw['norm_cfg'], groups, kw['inference_mode'], widths)
        return dict(base_strides=base_strides, patch_grids=patch_grids, patch_sizes=patch_sizes,
                    stem_channels=stem, stage_channels=tuple(channels))

    # ------------------------------------------------------------- build
    def _reset_parameters(self) -> None:
        """Kaiming-normal convs (fan out), unit norms; selectors and gates keep their own init."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self._reset_sar_layers()

    def _reset_sar_layers(self) -> None:
        """Selectors start by selecting everything, fusion gates as an even blend."""
        for module in self.modules():
            if isinstance(module, RegionSelector):
                module.reset_parameters()
            elif isinstance(module, FusionGate):
                for fc in (module.fc1, module.fc2):
                    nn.init.normal_(fc.weight, std=0.01)

    def architecture(self) -> Dict[str, object]:
        """The options that decide what each weight means (see :meth:`SARResNet.architecture`)."""
        return dict(type='SARMobileNetV2', widen_factor=self.widen_factor,
                    in_channels=self.in_channels, mask_groups=self.mask_groups,
                    base_strides=tuple(self.base_strides), alpha=self.alpha, beta=self.beta)

    def init_weights(self) -> None:
        """Initialise, or load ``Pretrained`` weights strictly (``conv2`` aside).

        A generic ``init_cfg`` (e.g. mmpretrain's Kaiming + Constant) would
        reset the selectors' biases and the fusion gates: their own
        initialisation is re-applied after it.
        """
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            filename = cfg['checkpoint']
            if '://' in str(filename):
                from mmengine.runner.checkpoint import _load_checkpoint
                ckpt = _load_checkpoint(filename, map_location=cfg.get('map_location', 'cpu'))
            else:
                ckpt = load_checkpoint_file(filename, map_location=cfg.get('map_location', 'cpu'))
            state = extract_state_dict(ckpt, cfg.get('prefix'), source=str(filename))
            skipped = self.unused_checkpoint_prefixes
            if skipped:
                state = OrderedDict((k, v) for k, v in state.items()
                                    if not k.startswith(skipped))
            check_backbone_state_dict(self, state, source=str(filename))
            self.load_state_dict(state, strict=True)
            self._is_init = True
            return
        super().init_weights()
        if cfg is not None:
            self._reset_sar_layers()

    # ------------------------------------------------------------ stages
    @property
    def sar_stages(self) -> List[SARInvertedResidualStage]:
        return [getattr(self, f'layer{i + 1}') for i in self.sar_layers]

    @property
    def unused_checkpoint_prefixes(self) -> Tuple[str, ...]:
        """Checkpoint keys this backbone skips: an ImageNet classifier's ``conv2``.

        A backbone without ``conv2`` (dense prediction, ``out_indices`` without
        7) loads the weights of its ImageNet pretraining all the same.
        """
        return () if hasattr(self, 'conv2') else ('conv2.', )

    @property
    def num_outputs(self) -> int:
        """Outputs available to ``out_indices`` (8 with ``conv2``, else 7)."""
        return len(self.layer_names)

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        self._freeze([self.conv1] + [getattr(self, name)
                                     for name in self.layer_names[:self.frozen_stages]])

    # ----------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        self._check_image_batch(x, self.conv1.conv.weight)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self._check_input(x)
        input_finite = torch.isfinite(x).all() if self.training else None
        # The sparse path has no autograd; with gradients the dense path runs.
        sparse = (not self.training and self.inference_mode == 'sparse'
                  and not torch.is_grad_enabled())
        checkpointing = self.with_cp and self.training and torch.is_grad_enabled()
        x = self.conv1(x)
        outs: List[Tensor] = []
        masks: List[Tensor] = []
        for index, name in enumerate(self.layer_names):
            layer = getattr(self, name)
            if isinstance(layer, SARInvertedResidualStage):
                args = (x, self._temperature, sparse, self._override_fn(len(masks)))
                # Non-reentrant checkpointing replays the RNG: same Gumbel samples.
                x, stage_masks = checkpoint(layer, *args, use_reentrant=False) \
                    if checkpointing else layer(*args)
                masks.extend(stage_masks)
            else:
                x = layer(x)
            if index in self.out_indices:
                outs.append(x)
        self._record = ForwardRecord(tuple(masks), input_finite, self._take_margins(len(masks)))
        return tuple(outs)

    # ------------------------------------------------------------ deploy
    def switch_to_deploy(self) -> 'SARMobileNetV2':
        """Prepare the model for inference, once (as :meth:`SARResNet.switch_to_deploy`).

        Folds every BatchNorm into its convolution (stem, every block,
        alignments, ``conv2``) and stacks each layer's region selectors, so
        that a sparse forward walks no weights and consults no cache. Eval
        only, and final: a deployed model cannot train. The refine branch
        runs in eager mode (its sparse kernels are not a registered
        operator, unlike SAR-ResNet's).

        Raises:
            RuntimeError: the model is in training mode.
            TypeError: a norm other than BatchNorm or a convolution other than
                a plain one is in the model (nothing is changed then).
            ValueError: a weight holds NaN or inf (nothing is changed then).
        """
        # The deploy step's own checks (norms, plain convs, finite weights).
        from sar_backbones.inference.deploy import check_deployable as _check_deployable
        if self.training:
            raise RuntimeError('switch_to_deploy() prepares a model for inference: call eval() '
                               'first')
        if self._deployed:
            return self
        _check_deployable(self)
        for stage in self.sar_stages:
            stage.switch_to_deploy()
        for module in self.modules():
            if isinstance(module, InvertedResidual):
                module.switch_to_deploy()  # the plain layers' (a no-op for the SAR layers')
        for name, module in self.named_modules():  # the stem and conv2
            if isinstance(module, ConvModule) and module.with_norm and \
                    not isinstance(module.norm, nn.Identity):
                module.conv = folded_conv(module.conv, module.norm, f'{name}.conv')
                setattr(module, module.norm_name, nn.Identity())
        left = [name for name, module in self.named_modules() if isinstance(module, _BatchNorm)]
        if left:
            raise AssertionError(f'deploy left BatchNorm layers unfolded: {left}')
        self._deployed = True
        return self
