"""Batch-1 latency of the other SAR backbones against their plain counterparts (issue 19).

The benchmark behind ``tools/analysis/benchmark_latency.py --arch``
(``resnext50-32x4d`` or ``mobilenet-v2``; SAR-ResNet has the full benchmark of
:mod:`benchmarks.latency`). For every thread count and input size, one
interleaved timing run (:func:`benchmarks.timing.interleaved_timing`) holds,
on the same input:

* ``plain``: the network the SAR backbone replaces, with the same widths,
  strides and dilations (:func:`tools.analysis.get_flops.reference_model`:
  mmdet's ResNeXt, mmpretrain's MobileNetV2), BatchNorm folded (mmcv's
  ``fuse_conv_bn``);
* ``sar-dense@r`` / ``sar-sparse@r``: the SAR backbone with its default SAR
  options, deployed (``switch_to_deploy()``: BatchNorm folded), eager, with
  random patch masks at exactly the activation rate ``r``
  (``set_mask_override(r, seed)``), through the dense masked path and the
  sparse path. SAR-ResNeXt's sparse refine work is the fused refine op
  (native kernel where built); SAR-MobileNetV2's is its own PyTorch sparse
  engine (:mod:`sar_backbones.inference.sparse_inverted_residual`).

Weights are random. Each run also checks sparse == dense (max relative error).
"""
import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import fuse_conv_bn
from torch import Tensor

from benchmarks.timing import interleaved_timing, max_relative_error, set_threads, summarize

# --arch name -> (SAR backbone class name in sar_backbones.models, its keyword arguments)
ARCHS: Dict[str, Tuple[str, dict]] = OrderedDict([
    ('resnext50-32x4d', ('SARResNeXt', dict(depth=50, groups=32, base_width=4))),
    ('mobilenet-v2', ('SARMobileNetV2', dict())),
])


def build_models(arch: str, seed: int = 0) -> Tuple[nn.Module, nn.Module, str]:
    """The deployed SAR backbone of ``arch``, its BN-folded plain counterpart and its name.

    Args:
        arch (str): A key of :data:`ARCHS`.
        seed (int): Seed of the random weights.

    Returns:
        tuple: ``(sar, plain, plain_name)``, both in eval mode.
    """
    import sar_backbones.models as models
    from tools.analysis.get_flops import reference_model
    if arch not in ARCHS:
        raise ValueError(f'arch must be one of {list(ARCHS)}, got {arch!r}')
    class_name, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    sar = getattr(models, class_name)(**kwargs)
    sar.eval()
    plain, name = reference_model(sar)
    plain.eval()  # mmdet's ResNet.train() returns None: not chained
    plain = fuse_conv_bn(copy.deepcopy(plain))
    sar.switch_to_deploy()
    return sar, plain, name


def _outputs(out) -> List[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _sar_call(sar: nn.Module, x: Tensor, mode: str, rate: float,
              seed: int) -> Callable[[], object]:
    def call():
        sar.set_inference_mode(mode)
        sar.set_mask_override(rate, seed=seed)
        return sar(x)
    return call


def run_arch_benchmark(arch: str, sizes: Sequence[Tuple[int, int]], threads: Sequence[int],
                       rates: Sequence[float], reps: int, warmup: int, seed: int = 0,
                       log: Optional[Callable[[str], None]] = None) -> Dict[str, list]:
    """Time plain vs SAR dense vs SAR sparse; returns ``{'rows', 'checks'}``.

    Args:
        arch (str): A key of :data:`ARCHS`.
        sizes (Sequence[tuple]): Input sizes ``(H, W)``.
        threads (Sequence[int]): Thread counts (0: all logical CPUs).
        rates (Sequence[float]): Activation rates ``t`` of the random masks.
        reps (int): Timed interleaved rounds.
        warmup (int): Untimed rounds first.
        seed (int): Seed of the weights, input and masks.
        log (Callable, optional): Progress lines.

    Returns:
        dict: ``rows`` (one per case, thread count and size: median/IQR/min ms,
        ratio to the plain network and, for sparse rows, the speed-up over
        dense) and ``checks`` (sparse vs dense max relative error).
    """
    log = log or (lambda line: None)
    sar, plain, plain_name = build_models(arch, seed)
    rows, checks = [], []
    for count in threads:
        count = set_threads(count)
        for size in sizes:
            key = f'{size[0]}x{size[1]}'
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
            cases: 'OrderedDict[str, Callable[[], object]]' = OrderedDict(
                plain=lambda: plain(x))
            for rate in rates:
                for mode in ('dense', 'sparse'):
                    cases[f'sar-{mode}@{rate:.2f}'] = _sar_call(sar, x, mode, rate, seed)
            with torch.inference_mode():
                check_rate = rates[0]
                dense = _outputs(_sar_call(sar, x, 'dense', check_rate, seed)())
                sparse = _outputs(_sar_call(sar, x, 'sparse', check_rate, seed)())
                actual_rate = float(sar.get_activation_rates().mean())
                error = max_relative_error(sparse, dense)
                checks.append(dict(size=key, threads=count, rate=check_rate,
                                   actual_rate=actual_rate, max_rel_error=error))
                log(f'[check] {arch} {key}: sparse vs dense max rel error {error:.2e}')
                log(f'[time] {arch} threads={count} size={key}: {len(cases)} cases x {reps} reps')
                samples = interleaved_timing(cases, reps, warmup, seed=seed)
            stats = {name: summarize(samples[name]) for name in cases}
            for name, stat in stats.items():
                row = dict(arch=arch, case=name, size=key, threads=count,
                           model=plain_name if name == 'plain' else type(sar).__name__,
                           median_ms=stat['median_ms'], iqr_ms=stat['p75_ms'] - stat['p25_ms'],
                           min_ms=stat['min_ms'], reps=stat['reps'],
                           ratio_vs_plain=stat['median_ms'] / stats['plain']['median_ms'])
                if name.startswith('sar-sparse@'):
                    dense_name = name.replace('sparse', 'dense')
                    row['speedup_vs_dense'] = stats[dense_name]['median_ms'] / stat['median_ms']
                rows.append(row)
    return dict(rows=rows, checks=checks)


def format_arch_report(report: dict) -> str:
    """Markdown of a ``--arch`` report (``meta``, ``rows``, ``checks``)."""
    meta = report['meta']
    lines = [
        f"# Latency: SAR {meta['arch']} vs its plain counterpart (batch 1, eager)\n",
        f"- machine: {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs; torch "
        f"{meta['torch']}",
        f"- date: {meta['date']}; code: sar_backbones {meta['code']}",
        f"- command: `{meta['command']}`",
        f"- SAR: {meta['sar']} (default SAR options), deployed, random masks at rate r "
        f"(`set_mask_override(r, seed={meta['seed']})`); plain: {meta['plain']}, BN folded; "
        f"{meta['reps']} interleaved rounds after {meta['warmup']} warm-up rounds, median",
        '',
        '| threads | size | case | median ms | IQR ms | / plain | sparse speed-up vs dense |',
        '|---|---|---|---|---|---|---|',
    ]
    for row in report['rows']:
        speedup = row.get('speedup_vs_dense')
        lines.append(f"| {row['threads']} | {row['size']} | {row['case']} | "
                     f"{row['median_ms']:.2f} | {row['iqr_ms']:.2f} | "
                     f"{row['ratio_vs_plain']:.2f}x | "
                     f"{'-' if speedup is None else f'{speedup:.2f}x'} |")
    lines += ['', 'Checks (sparse vs dense, max relative error): ' + '; '.join(
        f"{c['size']} rate {c['rate']}: {c['max_rel_error']:.1e}" for c in report['checks']), '']
    return '\n'.join(lines)
