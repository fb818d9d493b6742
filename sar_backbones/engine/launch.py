"""Config adjustments shared by ``tools/train.py`` and ``tools/test.py``.

The OpenMMLab configs assume GPUs for distributed runs: NCCL, SyncBN and a
DDP wrapper pinned to ``LOCAL_RANK``'s GPU. A ``torchrun`` launch on a CPU
machine needs gloo, plain BN and a device-less DDP wrapper instead, and
mmengine 0.10.7's ``init_dist`` calls ``torch.cuda.set_device`` before
creating the process group, which fails without a GPU. The helpers here make
the same config run on both.
"""
import os
from datetime import timedelta
from typing import Any

import torch
from mmengine.config import Config
from mmengine.logging import print_log


def swap_sync_bn(obj: Any) -> int:
    """Replace every ``type='SyncBN'`` by ``'BN'`` in a config, in place.

    Args:
        obj (Any): A config (or part of one).

    Returns:
        int: How many norm configs were changed.

    Example:
        >>> cfg = dict(norm_cfg=dict(type='SyncBN', requires_grad=True))
        >>> swap_sync_bn(cfg), cfg['norm_cfg']['type']
        (1, 'BN')
    """
    changed = 0
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == 'type' and value == 'SyncBN':
                obj[key] = 'BN'
                changed += 1
            else:
                changed += swap_sync_bn(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            changed += swap_sync_bn(value)
    return changed


def setup_distributed_for_device(cfg: Config, launcher: str) -> None:
    """Make a distributed config runnable on the machine's device.

    With a GPU nothing changes (NCCL, SyncBN, mmengine's own DDP set-up).
    Without one and ``launcher != 'none'``:

    * ``env_cfg.dist_cfg.backend`` becomes ``'gloo'`` and the process group is
      created here (mmengine's ``init_dist`` would first call
      ``torch.cuda.set_device``); the Runner then finds it initialised;
    * SyncBN becomes BN (PyTorch's SyncBN only runs on accelerators);
    * the DDP wrapper gets ``device_ids=None`` (mmengine's default passes
      ``device_ids=[LOCAL_RANK]``, a GPU index, which DDP rejects for a CPU
      module).

    Args:
        cfg (Config): The run's config, changed in place.
        launcher (str): ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.

    Example:
        >>> cfg = Config.fromfile('configs/sar_resnet/sar-resnet34-g2s2a2b1-t0.5_8xb32_in1k.py')
        >>> setup_distributed_for_device(cfg, 'pytorch')  # under torchrun
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        # slurm/mpi set up their own environment variables; mmengine's
        # helpers for them also select a GPU.
        raise NotImplementedError(
            f'launcher {launcher!r} without a GPU; use tools/dist_train.sh '
            f'(torchrun, launcher "pytorch") on CPU machines')
    env_cfg = cfg.setdefault('env_cfg', dict())
    dist_cfg = env_cfg.setdefault('dist_cfg', dict())
    if dist_cfg.get('backend', 'nccl') != 'gloo':
        print_log(f"No GPU: using the gloo backend instead of "
                  f"{dist_cfg.get('backend', 'nccl')!r}", logger='current')
        dist_cfg['backend'] = 'gloo'
    if swap_sync_bn(cfg.get('model', {})):
        print_log('No GPU: SyncBN replaced by BN', logger='current')
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper = cfg.model_wrapper_cfg
    if wrapper.get('type', 'MMDistributedDataParallel') in (
            'MMDistributedDataParallel', 'DistributedDataParallel'):
        # An explicit None survives mmengine's default device_ids=[LOCAL_RANK],
        # which DDP rejects for a CPU module.
        wrapper.setdefault('device_ids', None)
    if not torch.distributed.is_initialized():
        kwargs = {}
        if 'timeout' in dist_cfg:
            kwargs['timeout'] = timedelta(seconds=dist_cfg['timeout'])
        torch.distributed.init_process_group(
            backend='gloo',
            rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']),
            **kwargs)
