"""Test (evaluate) a detector, segmentor or classifier with a SAR-ResNet backbone.

A thin wrapper of mmengine's ``Runner``, like the ``tools/test.py`` of mmdet,
mmseg and mmpretrain. Besides the task metric (mAP, mIoU, top-1) the shipped
configs' ``SARRateLoggerHook`` reports the mean activation rate
(``act_rate``, per stage too) and the backbone's ``effective_gflops``; the
final line of the log holds them all.

Example:
    python tools/test.py CONFIG CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --out results.pkl
    python tools/test.py CONFIG CHECKPOINT --cfg-options model.backbone.inference_mode=dense
    tools/dist_test.sh CONFIG CHECKPOINT 8
"""
import argparse
import os
import os.path as osp
import sys
from typing import Any, Mapping

from mmengine.config import Config, DictAction
from mmengine.evaluator import DumpResults
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from torch import nn

import sar_backbones  # noqa: F401  (registries and compat fixes)
from sar_backbones.engine import setup_distributed_for_device
from sar_backbones.models.backbones.checkpoint import (ArchitectureCheckedLoading,
                                                       BackboneCheckpointMismatchError,
                                                       CheckpointReadError,
                                                       check_backbone_state_dict, describe_mismatch,
                                                       extract_state_dict, load_checkpoint_file)
from sar_backbones.utils.cli import ArgumentParser, check_output_file, non_negative_int


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description='Test a model with a SAR-ResNet backbone')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the dir to save logs and the evaluation metrics')
    parser.add_argument(
        '--out', help='dump the raw predictions to this pickle file (.pkl)')
    parser.add_argument(
        '--overwrite', action='store_true', help='replace an existing --out file')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, xxx=yyy pairs merged into the config')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=non_negative_int, default=0)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'argument --out: must be a .pkl file, got {args.out}')
    check_output_file(parser, '--out', args.out, args.overwrite,
                      [('config', args.config), ('checkpoint', args.checkpoint)])
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_config(args: argparse.Namespace) -> Config:
    """The config of the test run described by the command line."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    # Runner.test() loads the whole model from here and never runs the
    # backbone's Pretrained init, so the ImageNet file need not exist.
    cfg.load_from = args.checkpoint
    setup_distributed_for_device(cfg, args.launcher)
    return cfg


class CheckpointMismatchError(ValueError):
    """The checkpoint does not provide the weights of the tested model."""


def check_checkpoint_fits(model: nn.Module, checkpoint: Mapping[str, Any], path: str) -> None:
    """Refuse a checkpoint that would leave part of the tested model untrained.

    mmengine's ``load_checkpoint`` only logs missing and mis-shaped keys, and
    the test would then publish the metric of a partly random model. Every
    weight of the model must be in the checkpoint with its shape (a missing
    BN ``num_batches_tracked`` is fine, as in mmengine), and every SAR
    backbone must get weights of its own architecture (also where shapes
    agree, e.g. base stride 2 vs 4). Extra keys are left to mmengine's
    warning: they do not change what is evaluated.

    Args:
        model (nn.Module): The runner's model (a DDP wrapper is unwrapped).
        checkpoint (Mapping): As read by ``load_checkpoint_file``.
        path (str): The checkpoint file, for messages.

    Raises:
        CheckpointReadError: If it holds no state dict of tensors.
        BackboneCheckpointMismatchError: If a SAR backbone does not fit.
        CheckpointMismatchError: If other weights are missing or mis-shaped.
    """
    model = model.module if is_model_wrapper(model) else model
    state = extract_state_dict(checkpoint, source=path)
    for name, module in model.named_modules():
        if isinstance(module, ArchitectureCheckedLoading):
            prefix = f'{name}.' if name else ''
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if own:
                check_backbone_state_dict(module, own, source=path)
    expected = model.state_dict()
    known = {k: v for k, v in state.items() if k in expected}
    problem = describe_mismatch(model, known, ignore_missing=('num_batches_tracked', ))
    if not problem:
        return
    hint = ''
    if not known and all(f'backbone.{k}' in expected for k in state):
        hint = (' It holds backbone weights only (as written by '
                'tools/model_converters/sar2backbone.py); test a whole-model checkpoint '
                'saved by training.')
    raise CheckpointMismatchError(
        f'checkpoint {path} does not fit the model of the config: {problem}.{hint}')


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Read and check the checkpoint before any work (and before the runner
    # creates its work dir): an unreadable or foreign file is a usage error.
    checkpoint = load_checkpoint_file(args.checkpoint)
    cfg = build_config(args)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    check_checkpoint_fits(runner.model, checkpoint, args.checkpoint)
    del checkpoint  # Runner.test() loads it again, with its hooks
    if args.out is not None:
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    return runner.test()


if __name__ == '__main__':
    try:
        main()
    except (CheckpointReadError, BackboneCheckpointMismatchError,
            CheckpointMismatchError) as error:
        # A checkpoint the model cannot be evaluated with: one line, exit 2,
        # as for argument errors, and never a published number.
        print(f'{osp.basename(sys.argv[0])}: error: {" ".join(str(error).split())}',
              file=sys.stderr)
        sys.exit(2)
