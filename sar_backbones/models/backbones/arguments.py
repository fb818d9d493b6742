"""Validation of SAR backbone options: every wrong value is refused at construction, by name.

A wrong option must fail where it is given, with its name and what it
accepts, rather than deep inside ``range()``, a convolution or the first
forward. The checks here are pure functions of the options so that the
constructor, the setters and the config tests share them.
"""
import math
import numbers
from typing import Optional, Sequence, Tuple

from ..errors import InvalidArgumentError
from ..layers import Bottleneck
from ..layers.gumbel import check_temperature

# Convolution layer types that compute ``F.conv2d(x, weight, bias)`` with the
# stored weight as it is, i.e. that the sparse path (and BN folding) reproduce.
PLAIN_CONV_TYPES = ('Conv', 'Conv2d')
# Hidden channels per mask group of a region selector (RegionSelector's default).
_SELECTOR_HIDDEN_PER_GROUP = 4


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_int(value, name: str, minimum: Optional[int] = None, accepts: str = '') -> int:
    """``value`` as an int, or an error naming ``name`` and what it accepts."""
    if not _is_int(value) or (minimum is not None and value < minimum):
        what = accepts or ('an int' if minimum is None else f'an int >= {minimum}')
        raise InvalidArgumentError(f'{name} must be {what}, got {value!r}')
    return int(value)


def require_int_sequence(value, name: str, length: Optional[int] = None,
                         accepts: str = '') -> Tuple[int, ...]:
    """``value`` as a tuple of ints (of ``length`` items), or an error naming ``name``."""
    what = accepts or ('a sequence of ints' if length is None else f'{length} ints')
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(_is_int(v) for v in value) or (length is not None and len(value) != length):
        raise InvalidArgumentError(f'{name} must be {what}, got {value!r}')
    return tuple(int(v) for v in value)


def per_stage(value, name: str, num_stages: int = 3) -> Tuple[Optional[int], ...]:
    """Broadcast a per-SAR-stage option (int, None or one int per stage) to the stages."""
    if value is None or _is_int(value):
        return (value, ) * num_stages
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and \
            len(value) != num_stages:
        raise InvalidArgumentError(f'{name} needs one value per SAR stage ({num_stages}), got '
                                   f'{tuple(value)}')
    return require_int_sequence(value, name, num_stages,
                                accepts=f'an int or {num_stages} ints (one per SAR stage)')


def check_number(value: float, name: str, low: float, high: float, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number within ``[low, high]``.

    The one number check of the package (model options and the engine
    hooks' arguments).

    Args:
        value (float): The argument to check.
        name (str): Its name, for the error message.
        low (float): Lower bound.
        high (float): Upper bound.
        low_open (bool): Exclude ``low``. Defaults to False.
        high_open (bool): Exclude ``high``. Defaults to False.

    Returns:
        float: ``float(value)``.

    Raises:
        InvalidArgumentError: (a TypeError) if ``value`` is not a real number
            (bools are refused); (a ValueError) if it is NaN, infinite or out
            of range.
    """
    interval = (f"{'(' if low_open else '['}{low:g}, "
                f"{high:g}{')' if high_open else ']'}")
    if not _is_real(value):
        raise InvalidArgumentError(f'{name} must be a number in {interval}, got '
                                   f'{type(value).__name__} {value!r}')
    value = float(value)
    inside = ((low < value if low_open else low <= value)
              and (value < high if high_open else value <= high))
    if not (math.isfinite(value) and inside):
        raise InvalidArgumentError(f'{name} must be a finite number in {interval}, '
                                   f'got {value!r}')
    return value


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``, else an error naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f'{name} must be one of {tuple(choices)}, got {value!r}')
    return value


def check_flag(value: bool, name: str) -> bool:
    """``value`` if it is a bool, else an error naming ``name``."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f'{name} must be True or False, got '
                                   f'{type(value).__name__} {value!r}')
    return value


def check_rate_options(*, deterministic_rate_weight, deterministic_rate_tau
                       ) -> Tuple[float, float]:
    """The options of the deterministic-rate loss (ours, issue 16), checked by name.

    Returns:
        tuple: ``lambda_det`` (a finite number >= 0) and its relaxation
        temperature (in the accepted range of the Gumbel temperature tau).
    """
    weight = check_number(deterministic_rate_weight, 'deterministic_rate_weight (lambda_det)',
                          0., math.inf, high_open=True)
    tau = check_temperature(deterministic_rate_tau, 'deterministic_rate_tau')
    return weight, tau


def check_target_rate(target) -> float:
    """The target activation rate ``t`` as a float in (0, 1]."""
    if not _is_real(target) or not 0 < target <= 1:
        raise InvalidArgumentError(f'target_rate must be in (0, 1], got {target!r} (t, a number)')
    return float(target)


def check_conv_cfg(conv_cfg: Optional[dict], inference_mode: str) -> None:
    """The sparse path folds and slices the stored weights: only plain convolutions."""
    if conv_cfg is None:
        return
    if not isinstance(conv_cfg, dict) or 'type' not in conv_cfg:
        raise InvalidArgumentError(
            f"conv_cfg must be None or a dict with a 'type', got {conv_cfg!r}")
    if inference_mode == 'sparse' and conv_cfg['type'] not in PLAIN_CONV_TYPES:
        raise InvalidArgumentError(
            f"conv_cfg type {conv_cfg['type']!r} transforms its weights in forward, which the "
            f"sparse path (plain convolutions on the selected patches, BatchNorm folded) would "
            f"not reproduce; use inference_mode='dense' with it, or a plain conv_cfg "
            f'({" / ".join(PLAIN_CONV_TYPES)})')


def check_norm_cfg(norm_cfg, groups: int, inference_mode: str,
                   widths: Sequence[Tuple[str, float]] = ()) -> None:
    """The norm must fit every layer it is built for.

    GroupNorm (mmdet / mmseg ``dict(type='GN', num_groups=32)``) works on the
    dense path: the region selectors build it with ``G`` groups whatever
    ``num_groups`` says (see :class:`~sar_backbones.models.layers.RegionSelector`),
    every other normalised width (``widths``) must be a multiple of
    ``num_groups``. The sparse path folds BatchNorm into its convolutions:
    other norms need the dense path.
    """
    if not isinstance(norm_cfg, dict) or 'type' not in norm_cfg:
        raise InvalidArgumentError(f"norm_cfg must be a dict with a 'type', got {norm_cfg!r}")
    norm_type = norm_cfg['type']
    if inference_mode == 'sparse' and 'BN' not in str(norm_type):
        raise InvalidArgumentError(
            f"inference_mode='sparse' folds BatchNorm into the convolutions; norm_cfg type "
            f"{norm_type!r} needs inference_mode='dense' (in the config, or "
            "model.set_inference_mode('dense')): the refine branch then runs masked at full "
            'size, with the same outputs as training')
    num_groups = norm_cfg.get('num_groups')
    if norm_type == 'GN' and _is_int(num_groups) and num_groups >= 1:
        for label, width in widths:
            if width != int(width) or int(width) % num_groups:
                raise InvalidArgumentError(
                    f'norm_cfg {norm_cfg}: num_groups={num_groups} must divide the channels of '
                    f'every normalised layer, but the {label} has {width} channels; choose '
                    'base_channels / stem_channels / alpha / beta so that it does, or fewer '
                    'groups (the region selectors are exempt: their hidden layer of '
                    f'{_SELECTOR_HIDDEN_PER_GROUP} x G = {_SELECTOR_HIDDEN_PER_GROUP * groups} '
                    f'channels is normalised with G groups instead of num_groups={num_groups})')


def check_resnet_options(*, block, num_stages, style, avg_down, expansion, with_cp, multi_grid,
                         last_stage_blocks: int) -> None:
    """mmdet / mmseg / mmpretrain ResNet options, accepted where they mean something for SAR."""
    if num_stages != 4 or not _is_int(num_stages):
        raise InvalidArgumentError(
            f'num_stages must be 4 for SARResNet (three SAR stages and a plain stage 4), got '
            f'{num_stages!r}; choose the returned stages with out_indices')
    if style != 'pytorch':
        raise InvalidArgumentError(
            f"style must be 'pytorch' for SARResNet, got {style!r}: 'caffe' strides the first "
            "1x1 conv to load Caffe-converted ResNet weights, which do not fit SAR's branches; "
            'SAR ImageNet weights come from SAR pretraining (configs/sar_resnet)')
    for name, value in (('avg_down', avg_down), ('with_cp', with_cp)):
        check_flag(value, name)
    if expansion is not None and expansion != block.expansion:
        raise InvalidArgumentError(
            f'expansion must be None or {block.expansion} ({block.__name__}), got {expansion!r}')
    if multi_grid is not None:
        grid = require_int_sequence(multi_grid, 'multi_grid',
                                    accepts=f'{last_stage_blocks} positive ints (one per block '
                                    'of stage 4)')
        if len(grid) != last_stage_blocks or min(grid) < 1:
            raise InvalidArgumentError(f'multi_grid must hold {last_stage_blocks} positive ints '
                                       f'(one per block of stage 4), got {multi_grid!r}')


def _bool_per_stage(value, name: str, num_stages: int = 4) -> Tuple[bool, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            len(value) != num_stages or not all(isinstance(v, bool) for v in value):
        raise InvalidArgumentError(f'{name} must hold {num_stages} bools (one per stage), got '
                                   f'{value!r}')
    return tuple(value)


def block_options_per_stage(*, dcn, stage_with_dcn, plugins, conv_cfg, num_stages: int = 4
                            ) -> Tuple[Tuple[Optional[dict], ...], Tuple[list, ...]]:
    """mmdet's ``dcn`` / ``stage_with_dcn`` / ``plugins`` as a config per stage.

    Returns the deformable conv config (or None) and the list of plugins
    (``dict(cfg=..., position=...)``, ``stages`` removed) of each stage. The
    blocks check the rest (positions, names, block type) when built.
    """
    with_dcn = _bool_per_stage(stage_with_dcn, 'stage_with_dcn', num_stages)
    if dcn is not None:
        if not isinstance(dcn, dict) or 'type' not in dcn:
            raise InvalidArgumentError(f"dcn must be None or a conv config dict with a 'type' "
                                       f"(e.g. dict(type='DCN', deform_groups=1, "
                                       f"fallback_on_stride=False)), got {dcn!r}")
        if conv_cfg is not None and any(with_dcn):
            raise InvalidArgumentError(f'conv_cfg must be None when dcn is given (dcn replaces '
                                       f'the 3x3 convs), got conv_cfg={conv_cfg!r}')
    stage_dcn = tuple(dcn if dcn is not None and flag else None for flag in with_dcn)
    stage_plugins: Tuple[list, ...] = tuple([] for _ in range(num_stages))
    if plugins is None:
        return stage_dcn, stage_plugins
    if isinstance(plugins, (str, bytes, dict)) or not isinstance(plugins, Sequence):
        raise InvalidArgumentError(f'plugins must be a list of dict(cfg=..., position=..., '
                                   f'stages=...), got {plugins!r}')
    for plugin in plugins:
        if not isinstance(plugin, dict):
            raise InvalidArgumentError(f'each plugin must be a dict(cfg=..., position=...), got '
                                       f'{plugin!r}')
        plugin = dict(plugin)
        stages = plugin.pop('stages', None)
        if stages is not None:
            stages = _bool_per_stage(stages, "a plugin's stages", num_stages)
        for index in range(num_stages):
            if stages is None or stages[index]:
                stage_plugins[index].append(plugin)
    return stage_dcn, stage_plugins


def drop_path_rates(rate, total_depth: int) -> Tuple[float, ...]:
    """mmpretrain's stochastic depth: rates rising linearly from 0 to ``rate`` over the blocks."""
    if isinstance(rate, bool) or not _is_real(rate) or not 0 <= rate < 1:
        raise InvalidArgumentError(f'drop_path_rate must be a number in [0, 1), got {rate!r}')
    if total_depth == 1:
        return (0.0, )
    return tuple(float(rate) * i / (total_depth - 1) for i in range(total_depth))


def norm_widths(*, block, stem_channels: int, deep_stem: bool, stage_channels, alpha,
                beta) -> Tuple[Tuple[str, int], ...]:
    """Every (label, channels) that ``norm_cfg`` normalises (the region selectors aside)."""
    bottleneck = getattr(block, 'expansion', 1) == 4
    widths = [('stem', stem_channels)]
    if deep_stem:
        widths.append(('deep stem (stem_channels / 2)', stem_channels // 2))

    def block_widths(label: str, out: float) -> None:
        widths.append((label, out))
        if bottleneck:  # ResNeXt's middle width follows the cardinality, not C/4
            mid = block.mid_width(int(out)) if hasattr(block, 'mid_width') else out / 4
            widths.append((f'{label} bottleneck middle', mid))

    for i, width in enumerate(stage_channels):
        if i == 3:
            block_widths('stage 4', width)
            continue
        in_width = stem_channels if i == 0 else stage_channels[i - 1]
        if i > 0:
            block_widths(f'SAR stage {i + 1} entry', in_width)
        block_widths(f'SAR stage {i + 1} base branch C/alpha', width / alpha)
        block_widths(f'SAR stage {i + 1} refine branch beta*C', width * beta)
        block_widths(f'SAR stage {i + 1} output C', width)
    return tuple(widths)


def check_arguments(*, block, depth, in_channels, stem_channels, stage_channels, groups,
                    base_strides, alpha, beta, patch_grids, patch_sizes, target_rate,
                    rate_loss, rate_loss_weight, temperature, strides, dilations, out_indices,
                    inference_mode, conv_cfg, norm_cfg, frozen_stages, pretrained,
                    deep_stem: bool = False) -> None:
    """Reject configurations that would build a wrong or broken model, naming the option."""
    require_int(in_channels, 'in_channels', 1)
    require_int(stem_channels, 'stem_channels', 1)
    require_int(groups, 'mask_groups (G)', 1, accepts='a positive int')
    for s in base_strides:
        if s not in (2, 4) or not _is_int(s):
            raise InvalidArgumentError(f'base_stride (s) must be 2 or 4, got {base_strides} '
                                       '(an int, or one int per SAR stage)')
    require_int(alpha, 'alpha', 1, accepts='a positive int (base width C/alpha)')
    if not _is_real(beta) or not (math.isfinite(beta) and beta > 0):
        raise InvalidArgumentError(f'beta must be > 0 (refine width beta*C), got {beta!r}; '
                                   'it must be a finite number')
    for name, values in (('patch_grid', patch_grids), ('patch_size', patch_sizes)):
        for v in values:
            if v is not None and (not _is_int(v) or v < 1):
                raise InvalidArgumentError(f'{name} must hold positive ints, got {values}')
    check_target_rate(target_rate)
    if rate_loss not in ('batch', 'sample'):
        raise InvalidArgumentError(
            f"rate_loss must be 'batch' (Eq. 10) or 'sample' (Eq. 11), got {rate_loss!r}")
    if not _is_real(rate_loss_weight) or not (math.isfinite(rate_loss_weight)
                                              and rate_loss_weight >= 0):
        raise InvalidArgumentError(f'rate_loss_weight (lambda) must be a finite number >= 0, '
                                   f'got {rate_loss_weight!r}')
    check_temperature(temperature)
    if not _is_int(frozen_stages) or frozen_stages not in range(-1, 5):
        raise InvalidArgumentError(f'frozen_stages must be -1 (none), 0 (stem) or 1..4 (stem '
                                   f'and the first stages), got {frozen_stages!r}')
    if inference_mode not in ('sparse', 'dense'):
        raise InvalidArgumentError(
            f"inference_mode must be 'sparse' or 'dense', got {inference_mode!r}")
    check_conv_cfg(conv_cfg, inference_mode)
    check_norm_cfg(norm_cfg, groups, inference_mode,
                   norm_widths(block=block, stem_channels=stem_channels, deep_stem=deep_stem,
                               stage_channels=stage_channels, alpha=alpha, beta=beta))
    if pretrained is not None and not isinstance(pretrained, str):
        raise InvalidArgumentError(f'pretrained must be a checkpoint path (str) or None, got '
                                   f'{pretrained!r}; prefer init_cfg=dict(type=\'Pretrained\', '
                                   'checkpoint=...)')
    for values in (strides, dilations):
        if isinstance(values, Sequence) and len(values) != 4:
            raise InvalidArgumentError(
                f'strides and dilations need 4 values (one per stage), got '
                f'strides={tuple(strides)}, dilations={tuple(dilations)}')
    strides = require_int_sequence(strides, 'strides', 4, accepts='4 ints (one per stage)')
    dilations = require_int_sequence(dilations, 'dilations', 4, accepts='4 ints (one per stage)')
    if strides[0] != 1:
        raise InvalidArgumentError(f'strides[0] must be 1: stage 1 works at the stem resolution, '
                                   f'got strides={strides}')
    for i, (s, d) in enumerate(zip(strides, dilations)):
        if s not in (1, 2) or d < 1:
            raise InvalidArgumentError(f'stage {i + 1}: stride must be 1 or 2 and dilation >= 1, '
                                       f'got strides={strides}, dilations={dilations}')
        if s > 1 and d > 1:
            raise InvalidArgumentError(
                f'stage {i + 1} both strides and dilates (strides={strides}, '
                f'dilations={dilations}); for output stride 8 use strides=(1, 2, 1, 1) '
                'and dilations=(1, 1, 2, 4)')
    indices = require_int_sequence(out_indices, 'out_indices',
                                   accepts='a sequence of distinct stage indices in 0..3')
    if not indices or any(i not in range(4) for i in indices) or len(set(indices)) != len(indices):
        raise InvalidArgumentError(
            f'out_indices must be distinct stage indices in 0..3, got {out_indices!r}')
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
                raise InvalidArgumentError(
                    f'mask_groups (G={groups}) must divide every channel count of SAR stage '
                    f'{i + 1}, but its {label} is {value} (C={width}, alpha={alpha}, beta={beta})')
