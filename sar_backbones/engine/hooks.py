"""mmengine hooks that drive and report SAR-ResNet's region selection.

* :class:`SARTemperatureHook` anneals the Gumbel-softmax temperature tau.
* :class:`SARTargetRateHook` steps the target activation rate t of the
  rate loss from 1 down to the configured value.
* :class:`SARGumbelNoiseHook` (short schedules, not in the paper) fades the
  Gumbel noise out at the end of training.
* :class:`SARRateLoggerHook` reports the mean activation rate and the
  resulting effective GFLOPs of the backbone after every val/test epoch, next
  to mAP / mIoU / top-1.

The schedules are pure functions of ``runner.iter / runner.max_iters``:
they keep no state of their own, so a resumed run sets exactly the values an
uninterrupted run would, for epoch- and iteration-based loops alike
(``runner.max_iters`` exists for both).
"""
import bisect
import logging
import math
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple

import torch
from mmengine.dist import all_gather_object
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel, is_model_wrapper
from torch import nn

from sar_backbones.registry import HOOKS

DATA_BATCH = Optional[dict]


def _is_sar_backbone(module: nn.Module) -> bool:
    return all(
        hasattr(module, name)
        for name in ('set_temperature', 'set_target_rate',
                     'get_activation_rates', 'get_aux_losses'))


def get_sar_backbone(model: nn.Module) -> nn.Module:
    """Find the SAR backbone of a task model.

    Args:
        model (nn.Module): A task model, possibly wrapped by DDP (or another
            mmengine model wrapper) or a test-time-augmentation model.

    Returns:
        nn.Module: ``model.backbone`` if it is a SAR backbone, otherwise the
        first sub-module that implements the SAR backbone API.

    Raises:
        TypeError: If the model contains no SAR backbone.

    Example:
        >>> backbone = get_sar_backbone(runner.model)
        >>> backbone.set_temperature(0.5)
    """
    # DDP keeps the real model in ``.module``; so do mmengine's TTA models.
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, nn.Module) and _is_sar_backbone(backbone):
        return backbone
    for module in model.modules():
        if _is_sar_backbone(module):
            return module
    raise TypeError(f'{type(model).__name__} has no SAR backbone (a module '
                    f'with set_temperature/set_target_rate/'
                    f'get_activation_rates/get_aux_losses); the SAR hooks '
                    f'only work with sar_backbones.SARResNet.')


def training_progress(runner) -> float:
    """Fraction of training done before the current iteration, in [0, 1].

    Args:
        runner (Runner): The mmengine runner.

    Returns:
        float: ``runner.iter / runner.max_iters`` clipped to [0, 1].
    """
    max_iters = runner.max_iters
    if max_iters <= 0:
        return 0.
    return min(max(runner.iter / max_iters, 0.), 1.)


class _ProgressScheduleHook(Hook):
    """Sets one value of the SAR backbone from the training progress before every iteration.

    Subclasses define ``value_at(progress)``, the backbone method that takes
    the value (``setter``) and the ``train/...`` key it is logged under.
    """

    priority = 'NORMAL'
    setter: str
    log_key: str

    def value_at(self, progress: float) -> float:
        raise NotImplementedError

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: DATA_BATCH = None) -> None:
        """Set the value for the coming iteration and log it."""
        value = self.value_at(training_progress(runner))
        getattr(get_sar_backbone(runner.model), self.setter)(value)
        runner.message_hub.update_scalar(self.log_key, value)


@HOOKS.register_module()
class SARTemperatureHook(_ProgressScheduleHook):
    """Anneal the Gumbel-softmax temperature of a SAR backbone.

    The paper (appendix "Optimization of Region Selection"): "the temperature
    tau in the Gumbel Softmax module decreases from 1.00 to 0.01
    exponentially". With progress ``p = runner.iter / runner.max_iters`` the
    temperature of each training iteration is

    * ``mode='exp'``: ``tau = start * (end / start) ** p``;
    * ``mode='constant'``: ``tau = start``.

    Because tau depends only on the iteration counter, resuming reproduces
    the schedule exactly. The value is logged as ``train/tau``.

    Args:
        mode (str): ``'exp'`` or ``'constant'``. Defaults to 'exp'.
        start (float): Temperature at the first iteration. Defaults to 1.0.
        end (float): Temperature approached at the end of training (``exp``
            mode only). Defaults to 0.01.

    Example:
        >>> custom_hooks = [
        ...     dict(type='sar_backbones.SARTemperatureHook',
        ...          start=1.0, end=0.01)
        ... ]
    """

    MODES = ('exp', 'constant')
    setter = 'set_temperature'
    log_key = 'train/tau'

    def __init__(self,
                 mode: str = 'exp',
                 start: float = 1.0,
                 end: float = 0.01) -> None:
        if mode not in self.MODES:
            raise ValueError(f'mode must be one of {self.MODES}, got {mode!r}')
        if start <= 0 or end <= 0:
            raise ValueError(f'temperatures must be positive, got start='
                             f'{start} and end={end}')
        self.mode = mode
        self.start = float(start)
        self.end = float(end)

    def get_temperature(self, progress: float) -> float:
        """The temperature at a given fraction of training.

        Args:
            progress (float): Fraction of training done, in [0, 1].

        Returns:
            float: The temperature tau.
        """
        if self.mode == 'constant':
            return self.start
        # Interpolating in log space is the exponential decay.
        return math.exp(
            math.log(self.start) +
            progress * (math.log(self.end) - math.log(self.start)))

    value_at = get_temperature


@HOOKS.register_module()
class SARGumbelNoiseHook(_ProgressScheduleHook):
    """Fade the Gumbel noise of training-mode mask sampling out at the end of training.

    Not part of the paper, for short schedules. Training samples masks with
    Gumbel noise; inference takes the noiseless decision. Over a long
    schedule the keep/skip logits grow far apart and both agree, but after a
    few hundred iterations a block can meet the target rate in training with
    logits that are nearly tied everywhere (a coin flip per patch), and then
    refines all or nothing of its patches at inference. Scaling the noise
    from 1 down to ``end`` over the last part of training lets the rate loss
    act on the decisions inference will take. With progress
    ``p = runner.iter / runner.max_iters``:
    ``scale = 1`` for ``p <= begin``, then linear to ``end`` at ``p = 1``.
    Logged as ``train/noise_scale``.

    Args:
        begin (float): Fraction of training at which the fade starts. Defaults to 0.7.
        end (float): Noise scale at the end of training, in [0, 1]. Defaults to 0.

    Example:
        >>> custom_hooks = [dict(type='sar_backbones.SARGumbelNoiseHook', begin=0.7)]
    """

    setter = 'set_noise_scale'
    log_key = 'train/noise_scale'

    def __init__(self, begin: float = 0.7, end: float = 0.) -> None:
        if not 0 <= begin < 1:
            raise ValueError(f'begin must be in [0, 1), got {begin}')
        if not 0 <= end <= 1:
            raise ValueError(f'end must be in [0, 1], got {end}')
        self.begin = float(begin)
        self.end = float(end)

    def get_noise_scale(self, progress: float) -> float:
        """The noise scale at a given fraction of training, in [0, 1]."""
        if progress <= self.begin:
            return 1.
        fade = (progress - self.begin) / (1 - self.begin)
        return 1. + min(fade, 1.) * (self.end - 1.)

    value_at = get_noise_scale


@HOOKS.register_module()
class SARTargetRateHook(_ProgressScheduleHook):
    """Step the target activation rate of a SAR backbone's rate loss.

    The paper: "the target activation rate t is first set to 1 in the
    beginning, and decays by three steps until the middle of the training
    procedure"; the authors' ImageNet scripts step at epochs 30, 45 and 60 of
    110 through ``t + 2(1-t)/3`` and ``t + (1-t)/3`` to ``t``. With progress
    ``p = runner.iter / runner.max_iters`` and ``n`` the number of
    ``milestones`` already reached (``p >= milestone``):

    * ``mode='step'``: ``target = t + (1 - t) * (3 - n) / 3``;
    * ``mode='constant'``: ``target = t``.

    ``t`` defaults to the ``target_rate`` the backbone was configured with,
    read once in ``before_run`` (before this hook changes it), so the config
    states t in one place. The value is logged as ``train/target_rate``.

    Args:
        target (float, optional): The final target rate t. Defaults to None
            (the backbone's configured ``target_rate``).
        mode (str): ``'step'`` or ``'constant'``. Defaults to 'step'.
        milestones (Sequence[float]): Three increasing fractions of training
            in (0, 1] at which the target steps down. Defaults to the ImageNet
            schedule ``(30/110, 45/110, 60/110)``.

    Example:
        >>> custom_hooks = [
        ...     dict(type='sar_backbones.SARTargetRateHook',
        ...          milestones=(30 / 110, 45 / 110, 60 / 110))
        ... ]
    """

    MODES = ('step', 'constant')
    setter = 'set_target_rate'
    log_key = 'train/target_rate'

    def __init__(self,
                 target: Optional[float] = None,
                 mode: str = 'step',
                 milestones: Sequence[float] = (30 / 110, 45 / 110,
                                                60 / 110)) -> None:
        if mode not in self.MODES:
            raise ValueError(f'mode must be one of {self.MODES}, got {mode!r}')
        milestones = tuple(float(m) for m in milestones)
        if (len(milestones) != 3 or list(milestones) != sorted(milestones)
                or not 0 < milestones[0] or not milestones[-1] <= 1):
            raise ValueError('milestones must be three increasing fractions '
                             f'of training in (0, 1], got {milestones}')
        if target is not None and not 0 <= target <= 1:
            raise ValueError(f'target must be in [0, 1], got {target}')
        self.target = target
        self.mode = mode
        self.milestones = milestones
        self._final_target: Optional[float] = target

    @property
    def final_target(self) -> float:
        """float: The target rate t reached at the last milestone."""
        if self._final_target is None:
            raise RuntimeError('the target rate is read from the model in '
                               'before_run, which has not run yet')
        return self._final_target

    def get_target_rate(self, progress: float) -> float:
        """The target rate at a given fraction of training.

        Args:
            progress (float): Fraction of training done, in [0, 1].

        Returns:
            float: The target activation rate.
        """
        t = self.final_target
        if self.mode == 'constant':
            return t
        reached = bisect.bisect_right(self.milestones, progress)
        return t + (1. - t) * (3 - reached) / 3

    value_at = get_target_rate

    def before_run(self, runner) -> None:
        """Read the configured target rate from the model (if not given)."""
        if self.target is None:
            self._final_target = float(
                get_sar_backbone(runner.model).target_rate)

    def after_train(self, runner) -> None:
        """Leave the model with its final target rate, whatever the mode."""
        get_sar_backbone(runner.model).set_target_rate(self.final_target)


@HOOKS.register_module()
class SARRateLoggerHook(Hook):
    """Report activation rate and effective GFLOPs after val/test epochs.

    While a val or test epoch runs, a forward hook on the SAR backbone
    records, for every backbone call, the input size and the per-sample,
    per-block activation rates (``get_activation_rates()``) together with the
    per-stage means of ``get_aux_losses()``. This sees every backbone call,
    also sliding-window and test-time-augmentation inference. At the end of
    the epoch (gathered over all ranks) it adds to the evaluator's metrics,
    logs and returns:

    * ``act_rate`` and ``act_rate_stage{i}``: mean activation rates;
    * ``effective_gflops``: backbone multiply-accumulates (in G, counted as
      the paper counts FLOPs) at the measured rates, averaged over all images
      with their actual input sizes (or at ``flops_input_shape``), from
      :func:`sar_backbones.analysis.model_complexity`.

    The entries appear in the ``Epoch(val)``/``Epoch(test)`` log line after
    mAP / mIoU / top-1 and in the dict returned by ``runner.val()`` /
    ``runner.test()``.

    Args:
        flops_input_shape (Sequence[int], optional): ``(C, H, W)`` at which to
            count FLOPs (with the epoch's mean per-block rates). Defaults to
            None: use the actual input sizes seen by the backbone.
        compute_flops (bool): Whether to report ``effective_gflops``.
            Defaults to True.

    Example:
        >>> custom_hooks = [dict(type='sar_backbones.SARRateLoggerHook')]
        >>> metrics = runner.test()
        >>> metrics['act_rate'], metrics['effective_gflops']
    """

    # Above LoggerHook ('BELOW_NORMAL'), which prints the message hub's
    # 'val/*' scalars in after_val_epoch, so ours are in that line.
    priority = 'NORMAL'

    def __init__(self,
                 flops_input_shape: Optional[Sequence[int]] = None,
                 compute_flops: bool = True) -> None:
        if flops_input_shape is not None and len(flops_input_shape) != 3:
            raise ValueError('flops_input_shape must be (C, H, W), got '
                             f'{flops_input_shape}')
        self.flops_input_shape = (
            tuple(int(s) for s in flops_input_shape)
            if flops_input_shape is not None else None)
        self.compute_flops = compute_flops
        self._handle = None
        # The architecture is fixed during a run: costs depend on size only.
        self._cost_cache: Dict[Tuple[int, ...], Tuple[float,
                                                      torch.Tensor]] = {}
        self._reset()

    def _reset(self) -> None:
        # Per input shape (C, H, W): summed per-block rates and sample count.
        self._block_sums: Dict[Tuple[int, int, int],
                               torch.Tensor] = defaultdict(lambda: 0.)
        self._counts: Dict[Tuple[int, int, int], int] = defaultdict(int)
        # Per 'act_rate*' key: sample-weighted sum.
        self._stat_sums: Dict[str, float] = defaultdict(float)

    # -- recording ---------------------------------------------------------
    def _record(self, module: nn.Module, args: tuple, output) -> None:
        if module.training:
            return
        inputs = args[0]
        shape = tuple(int(s) for s in inputs.shape[1:])
        # float64: the sums run over a whole validation set.
        rates = module.get_activation_rates().detach().double().cpu()
        batch = rates.shape[0]
        self._block_sums[shape] = self._block_sums[shape] + rates.sum(0)
        self._counts[shape] += batch
        for key, value in module.get_aux_losses().items():
            if key.startswith('act_rate'):
                self._stat_sums[key] += float(value) * batch

    def _start(self, runner) -> None:
        self._reset()
        self._remove_handle()
        backbone = get_sar_backbone(runner.model)
        self._handle = backbone.register_forward_hook(self._record)

    def _remove_handle(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- reporting ---------------------------------------------------------
    def _gather(self) -> Tuple[dict, dict, dict]:
        parts = all_gather_object(
            (dict(self._block_sums), dict(self._counts),
             dict(self._stat_sums)))
        block_sums: dict = defaultdict(lambda: 0.)
        counts: dict = defaultdict(int)
        stat_sums: dict = defaultdict(float)
        for part_sums, part_counts, part_stats in parts:
            for shape, value in part_sums.items():
                block_sums[shape] = block_sums[shape] + value
                counts[shape] += part_counts[shape]
            for key, value in part_stats.items():
                stat_sums[key] += value
        return block_sums, counts, stat_sums

    def _shape_cost(self, backbone: nn.Module,
                    shape: Tuple[int, ...]) -> Tuple[float, torch.Tensor]:
        """Rate-independent MACs and per-block refine MACs at rate 1."""
        # Counting runs a forward pass; detection inputs come in many sizes
        # and every val epoch sees them again, so cache per size.
        if shape not in self._cost_cache:
            # Imported lazily: the complexity counter is only needed here.
            from sar_backbones.analysis import model_complexity

            cost = model_complexity(backbone, input_shape=shape)
            self._cost_cache[shape] = (float(cost['flops_static']),
                                       torch.tensor(cost['flops_refine'],
                                                    dtype=torch.float64))
        return self._cost_cache[shape]

    def _effective_gflops(self, backbone: nn.Module, block_sums: dict,
                          counts: dict) -> float:
        # model_complexity: flops = static + sum_b rate_b * refine_b, linear
        # in the rates, so the mean rates per input size give the mean cost.
        total = sum(counts.values())
        if self.flops_input_shape is not None:
            static, refine = self._shape_cost(backbone, self.flops_input_shape)
            rates = sum(block_sums.values()) / total
            return (static + float(rates @ refine)) / 1e9
        weighted = 0.
        for shape, count in counts.items():
            static, refine = self._shape_cost(backbone, shape)
            weighted += static * count + float(block_sums[shape] @ refine)
        return weighted / total / 1e9

    def _finish(self, runner, mode: str, metrics: Optional[dict]) -> None:
        self._remove_handle()
        block_sums, counts, stat_sums = self._gather()
        total = sum(counts.values())
        if total == 0:
            print_log(
                'SARRateLoggerHook: the backbone ran no forward pass in '
                f'this {mode} epoch; nothing to report',
                logger='current')
            return
        results: Dict[str, float] = {
            key: value / total
            for key, value in sorted(stat_sums.items())
        }
        if self.compute_flops:
            backbone = get_sar_backbone(runner.model)
            try:
                results['effective_gflops'] = self._effective_gflops(
                    backbone, block_sums, counts)
            except Exception as error:  # noqa: BLE001
                # A reporting problem must not end a long training run.
                print_log(
                    'SARRateLoggerHook: could not count FLOPs '
                    f'({type(error).__name__}: {error})',
                    logger='current',
                    level=logging.WARNING)
        for key, value in results.items():
            runner.message_hub.update_scalar(f'{mode}/{key}', value)
            if metrics is not None:
                metrics[key] = value
        self._reset()

    def before_val_epoch(self, runner) -> None:
        """Start recording the backbone's activation rates."""
        self._start(runner)

    def before_test_epoch(self, runner) -> None:
        """Start recording the backbone's activation rates."""
        self._start(runner)

    def after_val_epoch(self,
                        runner,
                        metrics: Optional[Dict[str, float]] = None) -> None:
        """Add ``act_rate*`` and ``effective_gflops`` to the val metrics."""
        self._finish(runner, 'val', metrics)

    def after_test_epoch(self,
                         runner,
                         metrics: Optional[Dict[str, float]] = None) -> None:
        """Add ``act_rate*`` and ``effective_gflops`` to the test metrics."""
        self._finish(runner, 'test', metrics)
