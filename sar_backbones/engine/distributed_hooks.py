"""Hooks of distributed, resumable SAR training: rank-mean rate logging, per-rank noise seeds.

* :class:`SARRateSyncHook` makes the logged training activation rates the
  mean over all ranks (mmengine logs rank 0's own values only).
* :class:`SARNoiseSeedHook` makes the random numbers of every training
  iteration (the Gumbel noise of the region selectors and the data
  augmentation of the main process) a function of the seed, the rank and the
  iteration, so that a run resumed from a checkpoint samples the same masks
  and augmentations as an uninterrupted run, and the ranks differ.
"""
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch
from mmengine.dist import all_reduce, get_rank, get_world_size
from mmengine.hooks import Hook

from sar_backbones.registry import HOOKS

DATA_BATCH = Optional[Union[dict, tuple, list]]


def _batch_size(data_batch: DATA_BATCH) -> int:
    """Number of samples in a collated batch (1 when it cannot be told)."""
    inputs = data_batch.get('inputs') if isinstance(data_batch, dict) else None
    try:
        return max(len(inputs), 1) if inputs is not None else 1
    except TypeError:
        return 1


@HOOKS.register_module()
class SARRateSyncHook(Hook):
    """Log the training activation rates as the mean over all ranks.

    A SAR task model returns the detached activation rates of its local batch
    (``act_rate``, ``act_rate_stage{1,2,3}``) next to its losses, and
    mmengine's ``RuntimeInfoHook`` / ``LoggerHook`` log what rank 0 computed,
    with no reduction across ranks. Right after each training iteration and
    before ``RuntimeInfoHook`` records the outputs (hence the highest
    priority), this hook replaces every output whose key starts with one of
    ``prefixes`` by its sample-weighted mean over all ranks:
    ``sum_r n_r * rate_r / sum_r n_r`` with ``n_r`` the local batch size
    (equal to the plain mean over ranks for equal batches). Losses are left
    alone: they are optimised per rank (see ``SARResNet.rate_loss_value``) and
    mmengine logs them per rank as it does for every loss.

    Without distributed training the hook does nothing. Every rank must run
    it (it issues one all-reduce of a few floats per iteration).

    Args:
        prefixes (Sequence[str]): Output keys to average. Defaults to
            ``('act_rate', )``, which covers the per-stage rates.

    Example:
        >>> custom_hooks = [dict(type='sar_backbones.SARRateSyncHook')]
    """

    priority = 'HIGHEST'

    def __init__(self, prefixes: Sequence[str] = ('act_rate', )) -> None:
        if isinstance(prefixes, str):
            prefixes = (prefixes, )
        if not isinstance(prefixes, Sequence):
            raise TypeError('prefixes must be a string or a sequence of strings, '
                            f'got {type(prefixes).__name__} {prefixes!r}')
        if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise ValueError(f'prefixes must be non-empty strings, got {prefixes!r}')
        self.prefixes = tuple(prefixes)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        """Average the rate entries of ``outputs`` over ranks, in place."""
        if not outputs or get_world_size() == 1:
            return
        keys = sorted(k for k, v in outputs.items()
                      if k.startswith(self.prefixes) and isinstance(v, torch.Tensor))
        if not keys:
            return
        count = float(_batch_size(data_batch))
        local = torch.stack([outputs[k].detach().float().mean() * count for k in keys] +
                            [outputs[keys[0]].new_tensor(count, dtype=torch.float32)])
        all_reduce(local, op='sum')
        total = local[-1]
        for key, value in zip(keys, local[:-1]):
            outputs[key] = (value / total).to(outputs[key].dtype)


class _SeededBatches:
    """Wraps an iteration-based loop's batch iterator: seeds before every batch.

    ``IterBasedTrainLoop`` fetches the batch of iteration ``k`` right after
    the previous iteration (or, when resuming, after re-fetching the ``k``
    batches already trained), with no hook in between; counting fetches here
    gives each batch the same seed in a resumed and an uninterrupted run.
    """

    def __init__(self, iterator, seed_fn) -> None:
        self.iterator = iterator
        self.seed_fn = seed_fn
        self.fetched = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.seed_fn(self.fetched)
        self.fetched += 1
        return next(self.iterator)


@HOOKS.register_module()
class SARNoiseSeedHook(Hook):
    """Seed the random generators per rank and iteration, so that resuming is exact.

    Training samples the region masks with Gumbel noise from PyTorch's global
    generator, and data augmentation in the main process (``num_workers=0``)
    draws from Python's, NumPy's and PyTorch's global generators. mmengine
    checkpoints hold none of their states, so a run resumed from iteration
    ``k`` would draw other noise and other augmentations from ``k`` on than
    the uninterrupted run. This hook makes every draw a function of
    ``(runner.seed, rank, iteration)``:

    * before each training iteration, PyTorch's generator (CPU and CUDA) is
      seeded from ``(seed, rank, iteration)`` for the Gumbel noise;
    * with ``seed_data=True``, before each batch is loaded in the main
      process, Python's ``random``, NumPy's global generator and PyTorch's are
      seeded from ``(seed, rank, iteration)`` in another stream: in
      ``before_train_epoch`` and ``after_train_iter`` for epoch-based loops,
      and around the batch iterator of ``IterBasedTrainLoop`` (whose resume
      re-fetches the trained batches with no hook in between).

    Resumed and uninterrupted runs then compute bit-identical updates (see
    ``docs/robustness.md`` for the exact conditions). The rank is part of the
    seed, so the ranks of a distributed run draw different noise even when
    ``randomness.diff_rank_seed`` is off (the shipped configs' default);
    without it every rank would sample the same masks for its images'
    logits. Like the temperature and target-rate hooks it keeps no state, so
    it needs nothing in the checkpoint.

    Dataloader workers (``num_workers > 0``) are seeded by mmengine per worker
    when they start; this hook does not reach them.

    Args:
        seed_data (bool): Also seed the generators the data pipeline uses in
            the main process. Defaults to True.

    Example:
        >>> custom_hooks = [dict(type='sar_backbones.SARNoiseSeedHook')]
    """

    priority = 'HIGHEST'
    # Independent streams of seeds for the two purposes.
    NOISE_STREAM = 0
    DATA_STREAM = 1

    def __init__(self, seed_data: bool = True) -> None:
        if not isinstance(seed_data, bool):
            raise TypeError(f'seed_data must be True or False, got '
                            f'{type(seed_data).__name__} {seed_data!r}')
        self.seed_data = seed_data
        self._wrapped_iterator = False

    @staticmethod
    def _seed_sequence(seed: int, iteration: int, rank: int,
                       stream: int) -> np.random.SeedSequence:
        for name, value in (('seed', seed), ('iteration', iteration),
                            ('rank', rank), ('stream', stream)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f'{name} must be an integer, got {value!r}')
        for name, value in (('iteration', iteration), ('rank', rank),
                            ('stream', stream)):
            if value < 0:
                raise ValueError(f'{name} must be >= 0, got {value}')
        seed = int(seed)
        # SeedSequence mixes every word into every output bit: neighbouring
        # seeds, ranks and iterations give unrelated streams.
        entropy = [seed % 2**32, seed // 2**32 % 2**32, int(rank), int(stream),
                   int(iteration)]
        return np.random.SeedSequence(entropy)

    @classmethod
    def iteration_seed(cls,
                       seed: int,
                       iteration: int,
                       rank: int = 0,
                       stream: int = 0) -> int:
        """A well-mixed 63-bit seed for one iteration of one rank of a run seeded with ``seed``.

        Args:
            seed (int): The run's seed (``runner.seed``).
            iteration (int): The training iteration (``runner.iter``), >= 0.
            rank (int): The process's rank, >= 0. Defaults to 0.
            stream (int): Which use the seed is for (``NOISE_STREAM`` or
                ``DATA_STREAM``). Defaults to 0 (the noise).

        Returns:
            int: A seed in ``[0, 2**63)`` for ``torch.manual_seed``.
        """
        state = cls._seed_sequence(seed, iteration, rank, stream).generate_state(2, np.uint64)
        return int(state[0] >> np.uint64(1))

    def _seed_noise(self, runner) -> None:
        torch.manual_seed(self.iteration_seed(runner.seed, runner.iter, get_rank(),
                                              self.NOISE_STREAM))

    def _seed_data(self, runner, iteration: int) -> None:
        sequence = self._seed_sequence(runner.seed, iteration, get_rank(), self.DATA_STREAM)
        words = sequence.generate_state(4, np.uint64)
        torch.manual_seed(int(words[0] >> np.uint64(1)))
        random.seed(int(words[1]))
        np.random.seed(sequence.generate_state(4, np.uint32))

    def before_train(self, runner) -> None:
        """For iteration-based loops, seed the data generators before every batch fetch."""
        loop = runner.train_loop
        iterator = getattr(loop, 'dataloader_iterator', None)
        self._wrapped_iterator = False
        if not self.seed_data or iterator is None:
            return
        if not isinstance(iterator, _SeededBatches):
            loop.dataloader_iterator = _SeededBatches(
                iterator, lambda index: self._seed_data(runner, index))
        self._wrapped_iterator = True

    def before_train_epoch(self, runner) -> None:
        """Seed the data generators for the first batch of the epoch (epoch-based loops)."""
        if self.seed_data and not self._wrapped_iterator:
            self._seed_data(runner, runner.iter)

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: DATA_BATCH = None) -> None:
        """Seed PyTorch from the run's seed, the rank and the coming iteration."""
        self._seed_noise(runner)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        """Seed the data generators for the next batch (epoch-based loops)."""
        if self.seed_data and not self._wrapped_iterator:
            # runner.iter is incremented after this hook: the next batch is
            # the one of iteration runner.iter + 1.
            self._seed_data(runner, runner.iter + 1)
