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
from torch.utils.checkpoint import checkpoint

from sar_backbones.registry import MODELS
from ..layers import BasicBlock, Bottleneck, RegionSelector, ResidualBlock
from .arguments import (InvalidArgumentError, block_options_per_stage, check_arguments,
                        check_resnet_options, drop_path_rates, per_stage)
from .checkpoint import ArchitectureCheckedLoading, load_pretrained
from .sar_api import ForwardRecord, SARBackboneMixin
from .sar_stage import SARStage

IntOrTriple = Union[int, Sequence[int]]

# Default patch grid K per SAR stage when neither patch_grid nor patch_size is
# given: 4, 4 and 7-pixel patches at 224x224, the paper's headline model.
DEFAULT_PATCH_GRID = (14, 7, 2)


@MODELS.register_module()
class SARResNet(SARBackboneMixin, ArchitectureCheckedLoading, BaseModule):
    """SAR-ResNet backbone (variants ``G{G}s{base_stride}a{alpha}b{beta}``, target rate ``t``).

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

    The paper's recipe and ours (issue 16, docs/demo_results.md): the paper
    trains the selectors with the Gumbel-sampled masks only (Eq. 8-10, tau
    annealed 1 -> 0.01, t stepped 1 -> t) and binarises ``keep > skip`` at
    inference; that is the default here. A trained model's inference rate
    can then miss ``t`` per block: the sampled rate is ``mean sigmoid(keep -
    skip)`` in expectation, which tied logits satisfy while their hard
    decisions go all one way, and the selectors see batch statistics and
    augmented inputs in training but running statistics at test time.
    Options that are ours, off by default: ``deterministic_rate_weight``
    (a rate loss on the noise-free decisions), the Gumbel noise fade
    (:class:`~sar_backbones.engine.SARGumbelNoiseHook`) and the end-of-training
    per-block threshold calibration
    (:class:`~sar_backbones.engine.SARRateCalibrationHook`).

    Args:
        depth (int): 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        in_channels (int): Input image channels. Defaults to 3.
        stem_channels (int, optional): Stem width; None follows
            ``base_channels`` (mmdet's convention). Defaults to 64.
        base_channels (int): Width of stage 1 before block expansion. Defaults to 64.
        mask_groups (int, optional): ``G``, channel groups of the refine
            branch, each with its own mask. Defaults to 2.
        groups (int, optional): Deprecated alias of ``mask_groups`` (in
            mmdet ``groups`` is ResNeXt's cardinality).
        base_stride (int | Sequence[int]): ``s``, resolution reduction of the
            base branch, 2 or 4. An int applies to stages 1-2; stage 3 uses 2
            as in the authors' model. Defaults to 2.
        alpha (int): ``alpha``, base branch width ``C/alpha``. Defaults to 2.
        beta (float): ``beta``, refine branch width ``beta*C``. Defaults to 1.
        patch_grid (int | Sequence[int], optional): ``K`` per SAR stage: masks
            are ``K x K`` whatever the input size (the paper's setting).
            Defaults to (14, 7, 2): 4, 4 and 7-pixel patches at 224x224;
            a ``patch_size`` given alone replaces the default.
        patch_size (int | Sequence[int], optional): Fixed patch size in pixels
            per SAR stage instead of ``patch_grid`` (for detection-size
            inputs); e.g. (4, 4, 7). Give at most one of the two.
        target_rate (float): ``t``, target activation rate in (0, 1]. Defaults to 0.5.
        rate_loss (str): ``'batch'`` (paper Eq. 10) or ``'sample'`` (Eq. 11).
            Both are per block: each masked block's rate is held to ``t``
            (Eq. 10 squares each block's batch-mean rate before averaging
            over blocks, so one block at 0.02 and another at 0.98 do not
            satisfy it).
        rate_loss_weight (float): ``lambda`` of ``L = L_task + lambda * L_refine``.
        deterministic_rate_weight (float): ``lambda_det`` >= 0 of an extra
            term ``lambda_det * L_refine_det`` (not in the paper; ours, issue
            16): ``L_refine_det`` is Eq. 10 / 11 on the rates of the
            noise-free decisions ``1[keep > skip]`` that inference takes, with
            the gradient of ``sigmoid((keep - skip) / deterministic_rate_tau)``.
            The paper's loss sees only the Gumbel-sampled masks, whose rate
            is ``mean sigmoid(keep - skip)`` in expectation: logits nearly tied
            meet ``t`` in training and still refine all or nothing at
            inference. Defaults to 0 (the paper's loss alone).
        deterministic_rate_tau (float): Fixed temperature of that term's
            relaxed gradient, in [1e-4, 1e4]. Defaults to 1.
        temperature (float): Initial Gumbel-softmax temperature ``tau``, in
            [1e-4, 1e4] (the paper anneals it from 1 to 0.01).
        strides (Sequence[int]): Stride of each stage (ResNet semantics). Defaults to (1, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        out_indices (Sequence[int]): Stages to output. Defaults to (0, 1, 2, 3).
        deep_stem (bool): Three 3x3 convs instead of the 7x7 stem (ResNetV1c).
        contract_dilation (bool): Halve the dilation of the first block of a dilated stage.
        frozen_stages (int): Stages to freeze (-1: none, 0: stem only).
        conv_cfg (dict, optional): Conv layer config; the sparse path needs a
            plain convolution (others need ``inference_mode='dense'``).
        norm_cfg (dict): Norm layer config. Defaults to ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Keep norm layers in eval mode during training.
        zero_init_residual (bool): Zero the last norm of every residual block
            except the refine blocks' (see ``_reset_parameters`` for why).
        inference_mode (str): ``'sparse'`` (default) or ``'dense'`` in eval mode.
        with_cp (bool): Gradient checkpointing in training: each SAR stage and
            each block of stage 4 is recomputed in the backward pass (the
            Gumbel noise is replayed, so masks and rate loss are unchanged).
        multi_grid (Sequence[int], optional): Dilation multipliers of the
            stage-4 blocks (mmseg's DeepLab-v3 option), one per block.
        num_stages (int): Must be 4 (mmdet's option; select outputs with
            ``out_indices``).
        style (str): ``'pytorch'``: strided 3x3 convs (the only style whose
            ImageNet weights SAR can load).
        avg_down (bool): Accepted for config compatibility: SAR's downsampling
            shortcuts always average-pool first (ResNet-D, the authors' model).
        expansion (int, optional): mmpretrain's option; must equal the
            block's own (1 for BasicBlock, 4 for Bottleneck) when given.
        dcn (dict, optional): mmdet's deformable 3x3 conv (Bottleneck only),
            e.g. ``dict(type='DCN', deform_groups=1, fallback_on_stride=False)``,
            in the stages chosen by ``stage_with_dcn``. In a SAR stage the plain
            blocks take it (transition blocks, base branch); the refine blocks
            keep plain convs so that the sparse path stays exact.
        stage_with_dcn (Sequence[bool]): Stages with ``dcn``, one bool each.
        plugins (list[dict], optional): mmdet's plugin layers (Bottleneck
            only), ``dict(cfg=..., position='after_conv1|2|3', stages=...)``;
            in a SAR stage they go to the same plain blocks as ``dcn``.
        drop_path_rate (float): mmpretrain's stochastic depth: per-block drop
            rates rising linearly from 0 to this value with depth (base and
            refine blocks side by side share a rate). Training only.
        pretrained (str, optional): Deprecated, use ``init_cfg``.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained', checkpoint=...,
            prefix='backbone.')``; any mismatch with the architecture is an error.

    Example:
        >>> import torch
        >>> from sar_backbones.models import SARResNet
        >>> model = SARResNet(depth=50, mask_groups=2, base_stride=2, alpha=2, beta=1,
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
    # The paper's loss alone unless set (subclasses that build themselves keep it).
    deterministic_rate_weight = 0.0
    deterministic_rate_tau = 1.0

    def __init__(self,
                 depth: int,
                 in_channels: int = 3,
                 stem_channels: Optional[int] = 64,
                 base_channels: int = 64,
                 mask_groups: Optional[int] = None,
                 base_stride: IntOrTriple = 2,
                 alpha: int = 2,
                 beta: float = 1,
                 patch_grid: Optional[IntOrTriple] = DEFAULT_PATCH_GRID,
                 patch_size: Optional[IntOrTriple] = None,
                 target_rate: float = 0.5,
                 rate_loss: str = 'batch',
                 rate_loss_weight: float = 1.0,
                 temperature: float = 1.0,
                 deterministic_rate_weight: float = 0.0,
                 deterministic_rate_tau: float = 1.0,
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
                 with_cp: bool = False,
                 multi_grid: Optional[Sequence[int]] = None,
                 num_stages: int = 4,
                 style: str = 'pytorch',
                 avg_down: bool = False,
                 expansion: Optional[int] = None,
                 dcn: Optional[dict] = None,
                 stage_with_dcn: Sequence[bool] = (False, False, False, False),
                 plugins: Optional[List[dict]] = None,
                 drop_path_rate: float = 0.0,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None,
                 groups: Optional[int] = None) -> None:
        if pretrained is not None and isinstance(pretrained, str):
            if init_cfg is not None:
                raise ValueError('init_cfg and pretrained cannot be set at the same time')
            warnings.warn('SARResNet: `pretrained` is deprecated, use '
                          "init_cfg=dict(type='Pretrained', checkpoint=...)", DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        if type(depth) is not int or depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth} for SARResNet; choose from '
                           f'{sorted(self.arch_settings)}')
        groups = _mask_groups(mask_groups, groups)
        block, stage_blocks = self.arch_settings[depth]
        check_resnet_options(block=block, num_stages=num_stages, style=style, avg_down=avg_down,
                             expansion=expansion, with_cp=with_cp, multi_grid=multi_grid,
                             last_stage_blocks=stage_blocks[3])
        stage_dcn, stage_plugins = block_options_per_stage(
            dcn=dcn, stage_with_dcn=stage_with_dcn, plugins=plugins, conv_cfg=conv_cfg)
        # Depth positions: SAR stage 1 has n1-1 (base/refine pairs), stage 2 an
        # entry and n2-1 pairs, stage 3 also an exit: sum(stage_blocks) in all.
        block_drop_rates = list(drop_path_rates(drop_path_rate, sum(stage_blocks)))
        if stem_channels is None:
            stem_channels = base_channels
        if not (isinstance(base_channels, int) and not isinstance(base_channels, bool)
                and base_channels >= 1):
            raise InvalidArgumentError(f'base_channels must be an int >= 1, got {base_channels!r}')
        self.depth = depth
        self.in_channels = in_channels
        self.stage_channels = tuple(base_channels * 2**i * block.expansion for i in range(4))
        if patch_size is not None and patch_grid is DEFAULT_PATCH_GRID:
            patch_grid = None  # a fixed patch size replaces the default grid
        if patch_grid is not None and patch_size is not None:
            raise InvalidArgumentError(
                'give either patch_grid (K per stage) or patch_size, not both')
        if patch_grid is None and patch_size is None:
            raise InvalidArgumentError('one of patch_grid or patch_size must be set')
        base_strides = per_stage(base_stride, 'base_stride')
        if not isinstance(base_stride, Sequence):
            base_strides = (base_stride, base_stride, 2)  # stage 3: s = 2 as in the authors' model
        patch_grids = per_stage(patch_grid, 'patch_grid')
        patch_sizes = per_stage(patch_size, 'patch_size')
        check_arguments(
            block=block, depth=depth, in_channels=in_channels, stem_channels=stem_channels,
            stage_channels=self.stage_channels, groups=groups, base_strides=base_strides,
            alpha=alpha, beta=beta, patch_grids=patch_grids, patch_sizes=patch_sizes,
            target_rate=target_rate, rate_loss=rate_loss, rate_loss_weight=rate_loss_weight,
            temperature=temperature, strides=strides, dilations=dilations,
            out_indices=out_indices, inference_mode=inference_mode, conv_cfg=conv_cfg,
            norm_cfg=norm_cfg, frozen_stages=frozen_stages, pretrained=pretrained,
            deep_stem=deep_stem)

        self._init_sar_state(
            mask_groups=groups, rate_loss=rate_loss, rate_loss_weight=rate_loss_weight,
            deterministic_rate_weight=deterministic_rate_weight,
            deterministic_rate_tau=deterministic_rate_tau, target_rate=target_rate,
            temperature=temperature, inference_mode=inference_mode)
        self.base_strides = base_strides
        self.alpha = alpha
        self.beta = beta
        self.patch_grid = patch_grids if patch_grid is not None else None
        self.patch_size = patch_sizes if patch_size is not None else None
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.out_indices = tuple(out_indices)
        self.deep_stem = deep_stem
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.multi_grid = None if multi_grid is None else tuple(multi_grid)
        self.dcn = dcn
        self.stage_with_dcn = tuple(stage_with_dcn)
        self.plugins = plugins
        self.drop_path_rate = float(drop_path_rate)
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg

        self._make_stem(in_channels, stem_channels, conv_cfg, norm_cfg)
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)

        def first_dilation(stage: int) -> int:
            d = dilations[stage]
            return d // 2 if contract_dilation and d > 1 else d

        in_width = stem_channels
        for i in range(self.num_sar_stages):
            positions = stage_blocks[i] - 1 + int(i > 0) + int(i == self.num_sar_stages - 1)
            stage_rates, block_drop_rates = (block_drop_rates[:positions],
                                             block_drop_rates[positions:])
            stage = SARStage(
                block, in_width, self.stage_channels[i], stage_blocks[i], groups=groups,
                base_stride=base_strides[i], alpha=alpha, beta=beta,
                patch_grid=patch_grids[i], patch_size=patch_sizes[i], dilation=dilations[i],
                entry_stride=None if i == 0 else strides[i], entry_dilation=first_dilation(i),
                exit_block=i == self.num_sar_stages - 1, dcn=stage_dcn[i],
                plugins=stage_plugins[i], drop_path_rates=stage_rates, **common)
            self.add_module(f'layer{i + 1}', stage)
            stage.set_name(f'layer{i + 1}')  # error messages name the stage
            in_width = self.stage_channels[i]
        # mmseg's multi-grid replaces the contracted first dilation of stage 4.
        last_dilations = [first_dilation(3)] + [dilations[3]] * (stage_blocks[3] - 1) \
            if multi_grid is None else [dilations[3] * m for m in multi_grid]
        # Options go to a block only when set (block types without them build as before).
        last_options = dict(common, **({'dcn': stage_dcn[3]} if stage_dcn[3] else {}),
                            **({'plugins': stage_plugins[3]} if stage_plugins[3] else {}))
        self.layer4 = nn.Sequential(*(
            block(in_width if i == 0 else self.stage_channels[3], self.stage_channels[3],
                  stride=strides[3] if i == 0 else 1, dilation=d, **last_options,
                  **({'drop_path_rate': rate} if rate > 0 else {}))
            for i, (d, rate) in enumerate(zip(last_dilations, block_drop_rates))))
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
            elif isinstance(module, ResidualBlock):
                module.init_extra_weights()  # zero DCN offsets, plugins' own init
        if zero_init_residual:
            # Refine blocks keep their last norm: the masks act on the residual
            # branch only, so zeroing it would cut the task loss's gradient to
            # the region selectors, leaving them to the rate loss alone early on.
            refine = {id(b) for stage in self.sar_stages for b in stage.refine_blocks}
            for module in self.modules():
                if isinstance(module, ResidualBlock) and id(module) not in refine:
                    nn.init.zeros_(module.last_norm.weight)

    def architecture(self) -> Dict[str, object]:
        """The options that decide what each weight means, recorded in every state dict.

        A checkpoint whose record differs is refused when loaded (see
        :class:`ArchitectureCheckedLoading`), even where the shapes agree
        (base stride ``s`` 2 vs 4). How the network is applied (``patch_grid``
        / ``patch_size`` ``K``, ``strides``, ``dilations``, ``target_rate``
        ``t``, norm type) is left out: transferring ImageNet weights to
        detection and segmentation changes exactly those.
        """
        last_stem_conv = self.stem[-3] if self.deep_stem else self.conv1
        expansion = self.arch_settings[self.depth][0].expansion
        return dict(type='SARResNet', depth=self.depth, in_channels=self.in_channels,
                    stem_channels=last_stem_conv.out_channels,
                    base_channels=self.stage_channels[0] // expansion,
                    mask_groups=self.mask_groups, base_strides=tuple(self.base_strides),
                    alpha=self.alpha, beta=self.beta, deep_stem=bool(self.deep_stem))

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

    def _stem_modules(self) -> List[nn.Module]:
        return [self.stem] if self.deep_stem else [self.conv1, self.bn1]

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        self._freeze(self._stem_modules() + [getattr(self, f'layer{i}')
                                             for i in range(1, self.frozen_stages + 1)])

    # ------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        self._check_image_batch(x, (self.stem[0] if self.deep_stem else self.conv1).weight)
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
                    f'{size[0]}x{size[1]} feature map (stride {stride}) cannot hold a '
                    f'{grid}x{grid} patch grid (patch_grid={self.patch_grid}); feed at least '
                    f'{need}x{need} pixels or use patch_size=... (a grid that follows the '
                    'input size)')

    def _stem_forward(self, x: Tensor) -> Tensor:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self._check_input(x)
        # NaN/inf input makes every mask logit NaN, and NaN binarises to 'skip':
        # the rate loss would be finite but meaningless. get_aux_losses reports it
        # (checked there to avoid a second device synchronisation).
        input_finite = torch.isfinite(x).all() if self.training else None
        # The sparse path has no autograd support; with gradients enabled the
        # dense masked path computes the same function.
        sparse = (not self.training and self.inference_mode == 'sparse'
                  and not torch.is_grad_enabled())
        x = self._stem_forward(x)
        outs = []
        masks: List[Tensor] = []
        checkpointing = self.with_cp and self.training and torch.is_grad_enabled()
        for i, stage in enumerate(self.sar_stages):
            args = (x, self._temperature, sparse, self._override_fn(len(masks)))
            # Non-reentrant checkpointing replays the RNG state: the recomputed
            # Gumbel samples, hence the masks, are the ones of the first pass.
            x, stage_masks = checkpoint(stage, *args, use_reentrant=False) if checkpointing \
                else stage(*args)
            masks.extend(stage_masks)
            if i in self.out_indices:
                outs.append(x)
        for block in self.layer4:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        if 3 in self.out_indices:
            outs.append(x)
        self._record = ForwardRecord(tuple(masks), input_finite, self._take_margins(len(masks)))
        return tuple(outs)

    # -------------------------------------------------------------- deploy
    def switch_to_deploy(self) -> 'SARResNet':
        """Prepare the model for fast inference, once (as RepVGG's ``switch_to_deploy``).

        Folds BatchNorm into the convolutions and lays the weights out for
        the sparse kernels, so that a forward consults no caches; the deployed
        model compiles whole with ``torch.compile``. Eval only, and final: a
        deployed model cannot train.
        """
        from sar_backbones.inference.deploy import deploy_backbone
        if self.training:
            raise RuntimeError('switch_to_deploy() prepares a model for inference: call eval() '
                               'first')
        deploy_backbone(self)
        return self


def _mask_groups(mask_groups: Optional[int], groups: Optional[int]) -> int:
    """``G`` from ``mask_groups`` or its deprecated alias ``groups`` (default 2)."""
    if groups is not None:
        if mask_groups is not None and mask_groups != groups:
            raise InvalidArgumentError(
                f'mask_groups={mask_groups!r} and its deprecated alias groups={groups!r} differ; '
                'give mask_groups only')
        warnings.warn('SARResNet: `groups` is deprecated, use `mask_groups` (G): in mmdet '
                      '`groups` means ResNeXt cardinality', DeprecationWarning)
        return groups
    return 2 if mask_groups is None else mask_groups
