"""mmengine hooks that drive and report SAR-ResNet's region selection.

* :class:`SARTemperatureHook` anneals the Gumbel-softmax temperature tau.
* :class:`SARTargetRateHook` steps the target activation rate t of the
  rate loss from 1 down to the configured value.
* :class:`SARGumbelNoiseHook` (short schedules, not in the paper) fades the
  Gumbel noise out at the end of training.
* :class:`SARRateCalibrationHook` (ours, not in the paper) sets every
  block's inference threshold at the end of training so that its
  deterministic rate on the last training batches is t.
* :class:`SARRateLoggerHook` reports the mean, per-stage and per-block
  activation rates of the inference masks and the resulting effective
  GFLOPs of the backbone after every val/test epoch, next to mAP / mIoU /
  top-1, and the training rates since the previous validation.

The schedules are pure functions of ``runner.iter / runner.max_iters``:
they keep no state of their own, so a resumed run sets exactly the values an
uninterrupted run would, for epoch- and iteration-based loops alike
(``runner.max_iters`` exists for both). Each schedule hook also sets its
value in ``before_train``, so a run never starts with a value left in the
model by an earlier run (for example one that was interrupted), and the
arguments of every hook are checked when it is built.
"""
import bisect
import copy
import logging
import math
import numbers
import weakref
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple

import torch
from mmengine.dist import all_gather_object
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel, is_model_wrapper
from torch import nn

# One set of argument checkers for the package: the model options' (they
# raise InvalidArgumentError, a TypeError and a ValueError at once).
from sar_backbones.models.backbones.arguments import check_choice, check_flag, check_number
from sar_backbones.models.errors import InvalidArgumentError
from sar_backbones.models.layers import RegionSelector
from sar_backbones.models.layers.gumbel import MAX_TEMPERATURE, MIN_TEMPERATURE
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


# What the schedule hooks wrote into each backbone during a run that has not
# finished yet: setter -> (value before the run's first write, last value
# written). ``after_train`` drops the entry of its hook; entries still there
# when the next run starts were left by an interrupted run.
_UNFINISHED: 'weakref.WeakKeyDictionary[nn.Module, Dict[str, Tuple[float, float]]]' = \
    weakref.WeakKeyDictionary()
# The backbone property that reads what each setter sets.
_GETTERS = {
    'set_temperature': 'temperature',
    'set_target_rate': 'target_rate',
    'set_noise_scale': 'noise_scale',
}


def _write(backbone: nn.Module, setter: str, value: float) -> None:
    """Set a schedule value, remembering the value it replaces for an interrupted run."""
    record = _UNFINISHED.setdefault(backbone, {})
    before = (record[setter][0]
              if setter in record else getattr(backbone, _GETTERS[setter]))
    getattr(backbone, setter)(value)
    record[setter] = (before, getattr(backbone, _GETTERS[setter]))


def _forget_writes(backbone: nn.Module, setter: str) -> Optional[float]:
    """Forget the writes of a finished run; returns the value from before its first write."""
    record = _UNFINISHED.get(backbone, {})
    before = record.pop(setter, (None, None))[0]
    if not record:
        _UNFINISHED.pop(backbone, None)
    return before


def undo_unfinished_run(backbone: nn.Module) -> Dict[str, float]:
    """Give back the values an interrupted run's schedule hooks left in ``backbone``.

    A run that crashes or is killed never reaches ``after_train``: the model
    object keeps the raised target rate t, the annealed temperature tau and
    the faded noise scale of its last iteration. A later run with the same
    model object calls this (every schedule hook's ``before_run`` does) and
    gets the values the backbone had before the interrupted run, except where
    someone set another value since.

    Args:
        backbone (nn.Module): The SAR backbone.

    Returns:
        dict: The restored values, by setter name.
    """
    restored = {}
    for setter, (before, written) in _UNFINISHED.pop(backbone, {}).items():
        if getattr(backbone, _GETTERS[setter]) == written:
            getattr(backbone, setter)(before)
            restored[setter] = before
    return restored


class _ProgressScheduleHook(Hook):
    """Sets one value of the SAR backbone from the training progress.

    Subclasses define ``value_at(progress)``, the backbone method that takes
    the value (``setter``) and the ``train/...`` key it is logged under. The
    value is set at the start of every run (``before_train``, after a resume
    has restored ``runner.iter``) and before every iteration; ``before_run``
    first undoes what an interrupted earlier run left in the same model.
    """

    priority = 'NORMAL'
    setter: str
    log_key: str

    def value_at(self, progress: float) -> float:
        raise NotImplementedError

    def _set(self, runner) -> float:
        value = self.value_at(training_progress(runner))
        _write(get_sar_backbone(runner.model), self.setter, value)
        return value

    def before_run(self, runner) -> None:
        """Undo the values an interrupted earlier run left in this model."""
        restored = undo_unfinished_run(get_sar_backbone(runner.model))
        if restored:
            print_log(
                'SAR schedule hooks: restored the values an interrupted '
                f'earlier run left in the model: {restored}',
                logger='current')

    def before_train(self, runner) -> None:
        """Set the value of the first iteration of this run (0 or the resumed one)."""
        self._set(runner)

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: DATA_BATCH = None) -> None:
        """Set the value for the coming iteration and log it."""
        runner.message_hub.update_scalar(self.log_key, self._set(runner))

    def after_train(self, runner) -> None:
        """Leave the model with the value it had before the run."""
        backbone = get_sar_backbone(runner.model)
        before = _forget_writes(backbone, self.setter)
        if before is not None:
            getattr(backbone, self.setter)(before)


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
    the schedule exactly. The value is logged as ``train/tau``. After
    training the backbone gets back the temperature it had before.

    Args:
        mode (str): ``'exp'`` or ``'constant'``. Defaults to 'exp'.
        start (float): Temperature at the first iteration, in
            ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` = [1e-4, 1e4] (the range
            of ``SARResNet.set_temperature``). Defaults to 1.0.
        end (float): Temperature approached at the end of training (``exp``
            mode only), in the same range. Defaults to 0.01.

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
        self.mode = check_choice(mode, 'mode', self.MODES)
        # The range SARResNet.set_temperature accepts: a schedule outside it
        # would otherwise fail only when training reaches that value.
        self.start = check_number(start, 'start', MIN_TEMPERATURE, MAX_TEMPERATURE)
        self.end = check_number(end, 'end', MIN_TEMPERATURE, MAX_TEMPERATURE)

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
    Logged as ``train/noise_scale``. After training the backbone gets back
    the noise scale it had before (so a later fine-tuning run without this
    hook samples with the paper's noise).

    Args:
        begin (float): Fraction of training at which the fade starts, in
            [0, 1). Defaults to 0.7.
        end (float): Noise scale at the end of training, in [0, 1]. Defaults to 0.

    Example:
        >>> custom_hooks = [dict(type='sar_backbones.SARGumbelNoiseHook', begin=0.7)]
    """

    setter = 'set_noise_scale'
    log_key = 'train/noise_scale'

    def __init__(self, begin: float = 0.7, end: float = 0.) -> None:
        # begin = 1 would divide by zero: the fade needs some training left.
        self.begin = check_number(begin, 'begin', 0., 1., high_open=True)
        self.end = check_number(end, 'end', 0., 1.)

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

    A model object that an interrupted run left at a raised target keeps
    its configured t: ``before_run`` first undoes what the interrupted run's
    schedule hooks set (see :func:`undo_unfinished_run`).

    Args:
        target (float, optional): The final target rate t, in (0, 1].
            Defaults to None (the backbone's configured ``target_rate``).
        mode (str): ``'step'`` or ``'constant'``. Defaults to 'step'.
        milestones (Sequence[float]): Three non-decreasing fractions of
            training in (0, 1] at which the target steps down. Defaults to the ImageNet
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
        self.mode = check_choice(mode, 'mode', self.MODES)
        self.milestones = self._check_milestones(milestones)
        # (0, 1] as SARResNet.set_target_rate: t = 0 would otherwise fail at
        # the last milestone, halfway through training.
        self.target = (None if target is None else check_number(
            target, 'target', 0., 1., low_open=True))
        self._final_target: Optional[float] = self.target

    @staticmethod
    def _check_milestones(milestones: Sequence[float]) -> Tuple[float, ...]:
        if isinstance(milestones, (str, bytes)) or not isinstance(
                milestones, Sequence):
            raise TypeError('milestones must be a sequence of three fractions '
                            f'of training, got {type(milestones).__name__} '
                            f'{milestones!r}')
        if len(milestones) != 3:
            raise ValueError('milestones must be three fractions of training '
                             f'(one per step of t), got {len(milestones)}: '
                             f'{tuple(milestones)!r}')
        values = tuple(
            check_number(m, f'milestones[{i}]', 0., 1., low_open=True)
            for i, m in enumerate(milestones))
        if list(values) != sorted(values):
            raise ValueError('milestones must be non-decreasing fractions of '
                             f'training in (0, 1], got {values}')
        return values

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
        """Read the configured target rate from the model (if not given).

        Values an interrupted earlier run left in the model are undone first,
        so that its raised target is not taken for the configured t.
        """
        super().before_run(runner)
        if self.target is None:
            self._final_target = float(
                get_sar_backbone(runner.model).target_rate)

    def after_train(self, runner) -> None:
        """Leave the model with its final target rate, whatever the mode."""
        backbone = get_sar_backbone(runner.model)
        _forget_writes(backbone, self.setter)
        backbone.set_target_rate(self.final_target)


@HOOKS.register_module()
class SARRateCalibrationHook(Hook):
    """Set each block's inference threshold so that its deterministic rate is t (ours).

    Not part of the paper (issue 16). The paper trains the selectors on
    Gumbel-sampled masks with batch-statistics normalisation and augmented
    inputs, and binarises ``keep > skip`` at inference with running
    statistics. The per-block rate of those inference masks can end far
    from ``t`` on a short schedule: measured on the demo classifier after
    240 iterations, training rates 0.49 / 0.50 / 0.50 per SAR stage against
    held-out inference rates 0.40 / 0.54 / 0.56 (docs/demo_results.md).

    The hook keeps the last ``num_batches`` training batches. After the last
    iteration, before the checkpoint of that iteration or epoch is saved, it
    runs the backbone on them in eval mode (running statistics, no noise, no
    gradient) and shifts the keep bias of every selector group so that the
    deterministic masks of these batches select a share ``t`` of the patches
    of every block (:func:`calibrate_backbone`): Eq. 10's per-block target,
    met by the masks inference takes. The learned ranking of the patches is
    unchanged. Stage by stage, because a stage's masks change the input of
    the next stage's selectors. The shifts are logged.

    Training batches carry the training augmentation (e.g. random resized
    crops, where objects look larger than in the test's centre crops), which
    moves the margins: give ``pipeline`` (the test pipeline) to calibrate on
    ``num_batches`` batches of the training set loaded as inference loads
    images instead (the training loader's config with this pipeline,
    shuffled with a fixed seed).

    Args:
        num_batches (int): Batches to calibrate on: the last training
            batches, kept as the data loader gave them, or batches of the
            training set through ``pipeline``. Defaults to 16.
        target (float, optional): The rate to calibrate to, in (0, 1].
            Defaults to None: the backbone's target rate ``t`` when training
            ends (the final target of :class:`SARTargetRateHook`).
        pipeline (list[dict], optional): Data pipeline (usually the test
            pipeline) of the training set for calibration. Defaults to None
            (the last training batches).
        batch_size (int, optional): Batch size with ``pipeline`` (e.g. 1
            where the test pipeline gives images of different sizes that the
            model's preprocessor does not pad in test mode). Defaults to
            None: the training loader's.

    Example:
        >>> custom_hooks = [dict(type='sar_backbones.SARRateCalibrationHook',
        ...                      pipeline=test_pipeline)]
    """

    # Before CheckpointHook ('VERY_LOW'), which saves in the same after_train_iter
    # / after_train_epoch call: the saved weights carry the calibration.
    priority = 'LOW'

    def __init__(self, num_batches: int = 16, target: Optional[float] = None,
                 pipeline: Optional[Sequence[dict]] = None,
                 batch_size: Optional[int] = None) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) \
                or num_batches < 1:
            raise InvalidArgumentError(f'num_batches must be an int >= 1, got {num_batches!r}')
        self.num_batches = int(num_batches)
        self.target = None if target is None else check_number(
            target, 'target', 0., 1., low_open=True)
        if pipeline is not None and (isinstance(pipeline, (str, bytes, dict))
                                     or not isinstance(pipeline, Sequence)
                                     or not all(isinstance(step, dict) for step in pipeline)):
            raise InvalidArgumentError(f'pipeline must be None or a list of transform dicts, '
                                       f'got {pipeline!r}')
        self.pipeline = None if pipeline is None else [dict(step) for step in pipeline]
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
                batch_size, numbers.Integral) or batch_size < 1):
            raise InvalidArgumentError(f'batch_size must be None or an int >= 1, got '
                                       f'{batch_size!r}')
        self.batch_size = batch_size
        self._batches: list = []

    def before_train(self, runner) -> None:
        self._batches = []

    def after_train_iter(self, runner, batch_idx: int, data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        """Keep the last batches; calibrate after the last iteration."""
        left = runner.max_iters - runner.iter  # this iteration included
        if left > self.num_batches or data_batch is None:
            return
        if self.pipeline is None:
            self._batches.append(data_batch)
        if left <= 1:
            if self.pipeline is not None:
                self._batches = self._load_batches(runner)
            self.calibrate(runner)

    def _load_batches(self, runner) -> list:
        """``num_batches`` batches of the training set through ``pipeline``."""
        from mmengine.runner import Runner  # the runner module imports the hooks
        train_cfg = getattr(runner, 'cfg', {}).get('train_dataloader')
        if not isinstance(train_cfg, dict) or not isinstance(train_cfg.get('dataset'), dict):
            raise TypeError('SARRateCalibrationHook(pipeline=...) rebuilds the training set from '
                            'the config (train_dataloader.dataset must be a config dict); '
                            'use pipeline=None to calibrate on the last training batches')
        cfg = copy.deepcopy(train_cfg)
        cfg['dataset']['pipeline'] = copy.deepcopy(self.pipeline)
        cfg.update(num_workers=0, persistent_workers=False,
                   sampler=dict(type='DefaultSampler', shuffle=True, seed=0))
        cfg.pop('batch_sampler', None)
        if self.batch_size is not None:
            cfg['batch_size'] = self.batch_size
        loader = Runner.build_dataloader(cfg, seed=0)
        return [batch for batch, _ in zip(loader, range(self.num_batches))]

    def calibrate(self, runner) -> Dict[int, list]:
        """Calibrate the backbone of ``runner.model`` on the kept batches.

        Returns:
            dict: Per masked block, the shift of each group's keep logit.
        """
        model = runner.model
        while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
            model = model.module
        backbone = get_sar_backbone(model)
        target = self.target if self.target is not None else float(backbone.target_rate)
        batches = self._batches

        def inputs():
            for data_batch in batches:
                yield model.data_preprocessor(data_batch, False)['inputs']

        after: Dict[int, float] = {}
        shifts, before = calibrate_backbone(backbone, inputs, target, gather=_gather_margins,
                                            after=after)
        rounded = {index: [round(v, 3) for v in values] for index, values in shifts.items()}
        source = ('training-set batches through the given pipeline' if self.pipeline
                  else 'last training batches')
        print_log(f'SARRateCalibrationHook: keep-logit shift per masked block and group '
                  f'{rounded} (eval-mode rates before: {before}; after: {after}; target '
                  f'{target:g}; on {len(batches)} {source})', logger='current')
        # Tied margins (a selector that scores many patches alike) cannot be split by a
        # threshold: say so rather than report t.
        missed = {index: rate for index, rate in after.items() if abs(rate - target) > 0.05}
        if missed:
            print_log(f'SARRateCalibrationHook: blocks {missed} stay more than 0.05 from '
                      f't = {target:g} after calibration: their selectors give many patches '
                      'the same margin (ties no threshold splits); train longer or with '
                      'a larger deterministic_rate_weight', logger='current',
                      level=logging.WARNING)
        self._batches = []
        return shifts


def _gather_margins(margins: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Concatenate every rank's margins ``(G, M_rank)`` per block (identity without DDP)."""
    parts = all_gather_object(margins)
    return {index: torch.cat([part[index] for part in parts if index in part], 1)
            for index in margins}


def calibrate_backbone(backbone: nn.Module, batches, target: float, gather=None,
                       after: Optional[Dict[int, float]] = None
                       ) -> Tuple[Dict[int, list], Dict[int, float]]:
    """Calibrate every masked block's threshold to rate ``t`` on some inputs, stage by stage.

    Args:
        backbone (nn.Module): The SAR backbone (changed in place).
        batches (Callable[[], Iterable[Tensor]]): Returns the input batches
            (called once per SAR stage).
        target (float): The rate ``t``.
        gather (Callable, optional): Combines the margins of all ranks.
        after (dict, optional): Filled with each block's rate on the same
            margins after its shift (see :func:`calibrate_thresholds`).

    Returns:
        tuple: See :func:`calibrate_thresholds`; the rates before are those
        of each stage after the stages before it were calibrated.
    """
    shifts: Dict[int, list] = {}
    before: Dict[int, float] = {}
    for cols in backbone.stage_block_slices():
        margins: Dict[int, list] = defaultdict(list)
        with torch.no_grad():
            for inputs in batches():
                for index, margin in enumerate(eval_margins(backbone, inputs)):
                    if cols.start <= index < cols.stop:
                        # (B, G, Kh, Kw) -> (G, B * Kh * Kw): one threshold per group.
                        margins[index].append(margin.transpose(0, 1).flatten(1).cpu())
        joined = {index: torch.cat(values, 1) for index, values in margins.items()}
        if gather is not None:
            joined = gather(joined)
        stage_shifts, stage_before = calibrate_thresholds(backbone, joined, target, after)
        shifts.update(stage_shifts)
        before.update(stage_before)
    return shifts, before


def calibrate_thresholds(backbone: nn.Module, margins: Dict[int, torch.Tensor], target: float,
                         after: Optional[Dict[int, float]] = None
                         ) -> Tuple[Dict[int, list], Dict[int, float]]:
    """Shift each selector group's keep bias so that a share ``t`` of ``margins`` is selected.

    The inference decision ``keep - skip > 0`` becomes ``keep - skip > q``
    with ``q`` between the ``k``-th and ``k+1``-th largest margin of the
    group, ``k = round(t * M)`` (the ``1 - t`` quantile; ours, see
    :class:`SARRateCalibrationHook`). Tied margins (e.g. patches whose
    hidden features are all zero after the ReLU) cannot be split: ``k`` then
    moves to the nearer end of the tie.

    Args:
        backbone (nn.Module): The SAR backbone (its selectors are changed in place).
        margins (dict[int, Tensor]): Per masked block to calibrate (index in
            mask order), the eval-mode margins ``(G, M)`` of ``M`` patches of
            each group. Blocks of a later stage must be measured after the
            earlier stages were calibrated (:func:`calibrate_backbone`).
        target (float): The rate ``t`` in (0, 1].
        after (dict, optional): Filled with each block's rate of the margins
            after the shift: ``t`` up to ``1/M``, unless ties kept it away.

    Returns:
        tuple: Per block, the shift of each group's keep logit, and the rate
        of the margins before the shift.
    """
    target = check_number(target, 'target', 0., 1., low_open=True)
    selectors = _selectors(backbone)
    if not set(margins) <= set(range(len(selectors))):
        raise ValueError(f'the backbone has {len(selectors)} masked blocks (0..'
                         f'{len(selectors) - 1}), got margins of blocks {sorted(margins)}')
    shifts, before = {}, {}
    for index in sorted(margins):
        selector = selectors[index]
        block = margins[index].detach().double().reshape(selector.groups, -1)
        threshold = torch.stack([_rate_threshold(group, target) for group in block.detach()])
        with torch.no_grad():
            bias = selector.fc.bias.view(selector.groups, 2)
            bias[:, 1] -= threshold.to(bias)
        shifts[index] = [-float(q) for q in threshold]
        before[index] = round(float((block > 0).double().mean()), 3)
        if after is not None:
            after[index] = round(float((block > threshold[:, None]).double().mean()), 3)
    return shifts, before


def _rate_threshold(values: torch.Tensor, target: float) -> torch.Tensor:
    """A threshold q with ``mean(values > q)`` as close to ``target`` as ties allow."""
    ordered = values.sort(descending=True).values
    count = len(ordered)
    k = int(round(target * count))
    if 0 < k < count and ordered[k - 1] == ordered[k]:
        tie = ordered[k - 1]
        above, at_least = int((ordered > tie).sum()), int((ordered >= tie).sum())
        k = above if target * count - above <= at_least - target * count else at_least
    if k == 0:
        return ordered[0] + 1.
    if k == count:
        return ordered[-1] - 1.
    return (ordered[k - 1] + ordered[k]) / 2


def _selectors(backbone: nn.Module) -> list:
    """The region selectors of a SAR backbone in mask order (not deployed)."""
    selectors = [m for m in backbone.modules() if isinstance(m, RegionSelector)]
    if not selectors:
        raise TypeError(f'{type(backbone).__name__} has no RegionSelector modules (a deployed '
                        'model cannot be calibrated)')
    return selectors


def eval_margins(backbone: nn.Module, inputs: torch.Tensor) -> list:
    """Noise-free margins ``keep - skip`` ``(B, G, Kh, Kw)`` of every masked block in eval mode.

    Runs the backbone once (dense path, no override) and leaves its modes,
    record and outputs as they were.
    """
    selectors = _selectors(backbone)
    margins: Dict[int, torch.Tensor] = {}

    def hook_for(index):
        def hook(module, args, output):
            skip, keep = module.logits(args[0], args[1]).float().unbind(2)
            margins[index] = keep - skip
        return hook

    # A hook on a selector also keeps the stacked fast path out of the way.
    handles = [s.register_forward_hook(hook_for(i)) for i, s in enumerate(selectors)]
    try:
        with backbone.temporary_settings(training=False, inference_mode='dense',
                                         mask_rate=None):
            backbone(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [margins[i] for i in range(len(selectors))]


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
    * ``act_rate_block{j}``: the mean rate of every masked block ``j``
      (1-based, in forward order), the deterministic inference masks;
    * after training iterations (val only): ``train_act_rate_stage{i}`` /
      ``train_act_rate_block{j}``, the Gumbel-sampled training rates
      averaged over the iterations since the previous validation, and
      ``train_act_rate_det_stage{i}``, the noise-free decisions of those
      training forwards (batch statistics), so that a gap between the rate
      training meets and the one inference takes shows where it arises
      (issue 16); a summary line per stage is printed;
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
        self.flops_input_shape = (None if flops_input_shape is None else
                                  self._check_shape(flops_input_shape))
        self.compute_flops = check_flag(compute_flops, 'compute_flops')
        self._handle = None
        # The architecture is fixed during a run: costs depend on size only.
        self._cost_cache: Dict[Tuple[int, ...], Tuple[float,
                                                      torch.Tensor]] = {}
        self._reset()
        self._reset_train()
        self._last_val: Dict[str, float] = {}

    def _reset_train(self) -> None:
        # Training rates since the last validation: per-block sums, iterations,
        # and the noise-free ('det') per-stage sums.
        self._train_sums: Optional[torch.Tensor] = None
        self._train_det: Dict[str, float] = defaultdict(float)
        self._train_iters = 0

    def after_train_iter(self, runner, batch_idx: int, data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        """Accumulate the per-block training rates of this iteration."""
        backbone = get_sar_backbone(runner.model)
        try:
            rates = backbone.get_activation_rates().detach().double().mean(0).cpu()
        except RuntimeError:
            return  # no forward recorded (e.g. a custom train_step)
        self._train_sums = rates if self._train_sums is None else self._train_sums + rates
        self._train_iters += 1
        for key, value in (outputs or {}).items():
            if key.startswith('act_rate_det_stage'):
                self._train_det[key] += float(value)

    @staticmethod
    def _check_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
        if (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence)
                or len(shape) != 3 or not all(
                    isinstance(s, numbers.Integral) and not isinstance(s, bool)
                    and s > 0 for s in shape)):
            raise ValueError('flops_input_shape must be three positive '
                             f'integers (C, H, W), got {shape!r}')
        return tuple(int(s) for s in shape)

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
        self._last_val = dict(results)
        block_rates = sum(block_sums.values()) / total
        for index, rate in enumerate(block_rates.tolist(), start=1):
            results[f'act_rate_block{index}'] = rate
        if mode == 'val':
            results.update(self._training_rates(runner))
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

    def _training_rates(self, runner) -> Dict[str, float]:
        """Training rates since the last validation, and a line comparing them per stage."""
        if not self._train_iters:
            return {}
        iters = self._train_iters
        train = (self._train_sums / iters).tolist()
        results = {f'train_act_rate_block{j}': r for j, r in enumerate(train, start=1)}
        results.update({f'train_{key}': value / iters for key, value in self._train_det.items()})
        slices = get_sar_backbone(runner.model).stage_block_slices()
        lines = []
        for index, cols in enumerate(slices, start=1):
            results[f'train_act_rate_stage{index}'] = sum(train[cols]) / max(len(train[cols]), 1)
        for index in range(1, len(slices) + 1):
            det = results.get(f'train_act_rate_det_stage{index}')
            lines.append(f'stage {index}: inference '
                         f'{self._last_val.get(f"act_rate_stage{index}", float("nan")):.3f}, '
                         f'training {results[f"train_act_rate_stage{index}"]:.3f}'
                         + ('' if det is None else f' (noise-free {det:.3f})'))
        print_log('SARRateLoggerHook: activation rates, inference (val) vs training (last '
                  f'{iters} iterations): ' + '; '.join(lines), logger='current')
        self._reset_train()
        return results

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
