"""Hooks that keep SAR training faithful across ranks and interruptions.

* :class:`SARRateSyncHook` makes the logged training activation rates the
  mean over all ranks (mmengine logs rank 0's own values only).
* :class:`SARNoiseSeedHook` makes the random numbers of every training
  iteration (the Gumbel noise of the region selectors) a function of the
  seed and the iteration, so that a run resumed from a checkpoint samples the
  same masks as an uninterrupted run.
"""
from typing import Optional, Sequence, Union

import numpy as np
import torch
from mmengine.dist import all_reduce, get_world_size
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


@HOOKS.register_module()
class SARNoiseSeedHook(Hook):
    """Reseed PyTorch's generator before every training iteration.

    Training samples the region masks with Gumbel noise from PyTorch's global
    generator. mmengine checkpoints do not hold the generator state, so a run
    resumed from iteration ``k`` draws different noise (and therefore
    different masks and gradients) from iteration ``k`` on than the
    uninterrupted run did. This hook seeds the generator before each training
    iteration from ``(runner.seed, runner.iter)``, which makes the noise of
    every iteration independent of what happened before it: resumed and
    uninterrupted runs then compute the same updates, on one process or many
    (each rank's ``runner.seed`` already differs when
    ``randomness.diff_rank_seed=True``). Like the temperature and target-rate
    hooks it keeps no state, so it needs nothing in the checkpoint.

    Only PyTorch's generator (and CUDA's, through ``torch.manual_seed``) is
    seeded: data augmentation in dataloader workers is seeded by mmengine per
    worker and does not resume exactly either way.

    Example:
        >>> custom_hooks = [dict(type='sar_backbones.SARNoiseSeedHook')]
    """

    priority = 'HIGHEST'

    @staticmethod
    def iteration_seed(seed: int, iteration: int) -> int:
        """A well-mixed 63-bit seed for one iteration of a run seeded with ``seed``."""
        entropy = [int(seed) % 2**32, int(seed) // 2**32 % 2**32, int(iteration)]
        return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: DATA_BATCH = None) -> None:
        """Seed PyTorch from the run's seed and the coming iteration."""
        torch.manual_seed(self.iteration_seed(runner.seed, runner.iter))
