"""Batch-1 latency of torchvision ResNets against SAR-ResNet (dense-masked and sparse).

The benchmark behind ``tools/analysis/benchmark_latency.py``. For every thread
count, input size and depth, one round-robin timing run holds all cases on the
same input:

* ``resnet{d}``: torchvision ResNet-``d`` backbone (stem + 4 stages, no head);
* ``resnet{d}+fold``: the same with BN folded into the convolutions;
* ``sar{d}-dense@r`` / ``sar{d}-sparse@r``: SAR-ResNet-``d`` with random
  patch masks at activation rate ``r`` (``set_mask_override``), through the
  dense masked path and the sparse gather-conv-scatter path;
* ``sar{d}-{dense,sparse}@learned``: a trained model's own masks (when a
  checkpoint is given).

The SAR models are folded or not according to ``bn_fold``: ``'both'`` folds
BN on both sides (SAR: deployed, ``switch_to_deploy()``, which also prepacks
the refine weights for the native kernel) and compares SAR with
``resnet{d}+fold``; ``'neither'``
folds nothing outside the sparse refine path (which always runs on folded
weights, part of the method) and compares with ``resnet{d}``. The other
ResNet is timed too, for reference. FLOPs follow the paper's convention
(:func:`sar_backbones.analysis.model_complexity`, :func:`~sar_backbones.analysis.count_macs`).
"""
import contextlib
import copy
import datetime
import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.parts import PartTimer, group_parts, part_macs, resnet_parts, sar_parts
from benchmarks.timing import (conv_backend, interleaved_timing, machine_info, max_relative_error,
                               profile_ops, set_threads, summarize)
from sar_backbones.analysis import count_macs, model_complexity
from sar_backbones.inference import native
from sar_backbones.inference.deploy import deploy_backbone
from sar_backbones.models.backbones import SARResNet
from sar_backbones.models.layers.blocks import fold_conv_norm
from tools.analysis.model_builders import (DEFAULT_PATCH_GRID, DEFAULT_PATCH_SIZE,
                                           build_preset_backbone, preset_name, torchvision_resnet)


@dataclass
class LatencyConfig:
    """Options of a latency benchmark run (see the tool's ``--help``)."""
    depths: Sequence[int] = (18, 34, 50)
    sizes: Sequence[Tuple[int, int]] = ((224, 224), (800, 1216))
    threads: Sequence[int] = (1, 0)  # 0: all logical CPUs
    rates: Sequence[float] = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)  # 0: the floor
    variant: Tuple[int, int, int, float] = (2, 2, 2, 1)  # G, s, alpha, beta
    reps: int = 20
    warmup: int = 3
    reps_by_size: Dict[str, int] = field(default_factory=dict)  # 'HxW' -> reps override
    depths_by_size: Dict[str, Sequence[int]] = field(default_factory=dict)  # 'HxW' -> depths
    modes: Sequence[str] = ('dense', 'sparse')
    bn_fold: str = 'both'  # 'both' | 'neither'
    channels_last: bool = False
    conv_backend: str = 'default'  # 'default' (PyTorch's dispatch) | 'onednn', both sides
    patch_mode: str = 'auto'  # 'auto' (grid at 224, size otherwise) | 'grid' | 'size'
    patch_grid: Sequence[int] = DEFAULT_PATCH_GRID
    patch_size: Sequence[int] = DEFAULT_PATCH_SIZE
    per_stage: bool = False
    per_stage_reps: int = 5
    per_stage_rates: Optional[Sequence[float]] = None  # None: all rates
    profile: bool = False
    profile_rate: float = 0.5
    profile_reps: int = 3
    check: bool = True
    seed: int = 0
    learned_backbone: Optional[SARResNet] = None  # a trained SAR backbone (learned masks)
    learned_inputs: Optional[Dict[Tuple[int, int], Tensor]] = None  # size -> (1,3,H,W)
    learned_name: str = 'learned'
    # torch.compile (default inductor) on both sides: ResNet (BN folded) and the
    # deployed SAR model (switch_to_deploy), as extra '+compiled' cases.
    compile: bool = False
    freezing: bool = False  # torch._inductor.config.freezing for both compiled sides
    # Implementations of the sparse refine op (SAR_REFINE_KERNEL): the first gives the
    # 'sar{d}-sparse@r' rows (targets, checks); the others extra 'sar{d}-sparse[kernel]@r' rows.
    refine_kernels: Sequence[str] = ('auto',)


def _size_key(size: Tuple[int, int]) -> str:
    return f'{size[0]}x{size[1]}'


def _patch_kwargs(cfg: LatencyConfig, size: Tuple[int, int]) -> dict:
    mode = cfg.patch_mode
    if mode == 'auto':
        mode = 'grid' if tuple(size) == (224, 224) else 'size'
    if mode == 'grid':
        return dict(patch_grid=tuple(cfg.patch_grid), patch_size=None)
    if mode == 'size':
        return dict(patch_grid=None, patch_size=tuple(cfg.patch_size))
    raise ValueError(f"patch_mode must be 'auto', 'grid' or 'size', got {mode!r}")


def _set_patches(backbone: SARResNet, patch_grid, patch_size) -> None:
    """Switch a built backbone between patch-grid and patch-size mode (weights unchanged)."""
    for index, stage in enumerate(backbone.sar_stages):
        stage.patch_grid = None if patch_grid is None else patch_grid[index]
        stage.patch_size = None if patch_size is None else patch_size[index]
    backbone.patch_grid = None if patch_grid is None else tuple(patch_grid)
    backbone.patch_size = None if patch_size is None else tuple(patch_size)


def _refine_blocks_with_masked_last_conv(model: nn.Module) -> List[nn.Module]:
    """Refine blocks whose dense path masks the output of a 3x3 last conv (BasicBlock).

    Folding BN into such a conv would move the BN shift inside the mask and
    change the dense masked function; they keep their BN (the sparse path
    folds it itself).
    """
    keep = []
    for module in model.modules():
        if isinstance(module, SARResNet):
            for stage in module.sar_stages:
                for block in stage.refine_blocks:
                    if block.specs[-1].kernel_size > 1:
                        keep.append(block)
    return keep


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every ``Conv2d`` followed by a ``BatchNorm`` sibling into the conv (eval only).

    Works on torchvision ResNets and on :class:`SARResNet` alike (the
    ``conv{i}``/``bn{i}`` and shortcut ``Sequential(conv, bn)`` layouts); the
    BN is replaced by ``nn.Identity``. Refine blocks whose dense masked path
    masks after a 3x3 last conv (BasicBlock) are left alone, see
    :func:`_refine_blocks_with_masked_last_conv`. Same rule as
    ``mmcv.cnn.fuse_conv_bn``: a BN is folded into the conv registered just before it.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    skip = {id(m) for m in _refine_blocks_with_masked_last_conv(model)}

    def visit(module: nn.Module) -> None:
        last_conv: Optional[nn.Conv2d] = None
        for name, child in list(module.named_children()):
            if id(child) in skip:
                last_conv = None
                continue
            if isinstance(child, _BatchNorm) and last_conv is not None:
                with torch.no_grad():
                    weight, bias = fold_conv_norm(last_conv, child)
                    last_conv.weight.copy_(weight)
                    last_conv.bias = nn.Parameter(bias)
                setattr(module, name, nn.Identity())
                last_conv = None
            elif isinstance(child, nn.Conv2d):
                last_conv = child
            else:
                visit(child)
    visit(model)
    return model


def _prepare(model: nn.Module, fold: bool, channels_last: bool) -> nn.Module:
    model = copy.deepcopy(model).eval()
    if fold:
        model = fold_batchnorm(model, inplace=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _prepare_sar(model: nn.Module, deploy: bool, channels_last: bool) -> Tuple[nn.Module, float]:
    """An eval copy of a SAR backbone, deployed when ``deploy``; and the deploy time (s).

    Deploying (``switch_to_deploy()``: BN folded, refine weights prepacked in
    the native kernel's layout) is what makes SAR fast; it comes after the
    ``channels_last`` conversion, which would re-layout the prepacked weights.
    """
    model = copy.deepcopy(model).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    seconds = 0.0
    if deploy:
        start = time.perf_counter()
        deploy_backbone(model)
        seconds = time.perf_counter() - start
    return model, seconds


def _sar_call(model: SARResNet, x: Tensor, mode: str, rate: Optional[float],
              seed: int, kernel: Optional[str] = None) -> Callable[[], object]:
    """One forward in ``mode`` at ``rate``; ``kernel``: the refine op implementation to use."""
    def call():
        if kernel is not None:
            native.set_refine_kernel(kernel)
        model.set_inference_mode(mode)
        model.set_mask_override(rate, seed=seed)
        return model(x)
    return call


def _mode_kernels(cfg: LatencyConfig) -> List[Tuple[str, Optional[str], str]]:
    """``(mode, refine kernel, case tag)`` of the SAR cases: one sparse case per kernel."""
    out = []
    for mode in cfg.modes:
        if mode != 'sparse':
            out.append((mode, cfg.refine_kernels[0], mode))
            continue
        for index, kernel in enumerate(cfg.refine_kernels):
            out.append((mode, kernel, 'sparse' if index == 0 else f'sparse[{kernel}]'))
    return out


def _compiled_models(cfg: LatencyConfig, resnets: Dict[int, Dict[str, nn.Module]],
                     sars: Dict[int, SARResNet], meta: dict) -> Dict[int, Dict[str, nn.Module]]:
    """``torch.compile`` of the BN-folded ResNet and of a deployed copy of each SAR model.

    ``sars``: the built (undeployed) SAR models. Compilation itself happens on
    the first call (timed in :func:`_time_compilation`); the deploy time goes
    to ``meta['deploy_s']``.
    """
    import torch._dynamo

    # One graph per (mode, rate, size) of the same SAR forward: allow them all.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    compiled = {}
    meta['deploy_s'] = {}
    for depth, sar in sars.items():
        deployed, meta['deploy_s'][str(depth)] = _prepare_sar(sar, True, cfg.channels_last)
        resnet = copy.deepcopy(resnets[depth][f'resnet{depth}+fold'])
        compiled[depth] = dict(resnet=torch.compile(resnet), sar=torch.compile(deployed),
                               deployed=deployed)
    return compiled


def _time_compilation(cases: 'OrderedDict[str, Callable[[], object]]', info: Dict[str, dict],
                      where: str, meta: dict, log: Callable[[str], None]) -> None:
    """Call every compiled case once (compiling it) and record the time in ``meta['compile_s']``."""
    times = meta.setdefault('compile_s', {})
    for name, call in cases.items():
        if info[name].get('compiled'):
            start = time.perf_counter()
            call()
            times[f'{name} {where}'] = time.perf_counter() - start
            log(f'[compile] {name} {where}: {times[f"{name} {where}"]:.1f} s')


def _fmt_rate(rate) -> str:
    return rate if isinstance(rate, str) else f'{rate:.2f}'


def run_latency_benchmark(cfg: LatencyConfig,
                          log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the benchmark; returns a JSON-serialisable dict (``meta``, ``results``, ...)."""
    if cfg.freezing and not cfg.compile:
        raise ValueError('freezing needs compile=True')
    kernels = list(cfg.refine_kernels)
    if not kernels or any(k not in native.KERNELS for k in kernels) or \
            len(set(kernels)) != len(kernels):
        raise ValueError(f'refine_kernels must be distinct names of {native.KERNELS}, '
                         f'got {kernels}')
    if 'native' in kernels and not native.load():
        raise RuntimeError(f'refine kernel native: the library is not built; run '
                           f'`{native.BUILD_COMMAND}`')
    native.set_refine_kernel(kernels[0])  # checks, per-stage timings and profiles
    try:
        with conv_backend(cfg.conv_backend), _inductor_freezing(cfg.freezing):
            report = _run_latency_benchmark(cfg, log)
    finally:
        native.set_refine_kernel(None)
    report['meta']['refine_kernel'] = dict(
        kernels=kernels, native_built=native.load(),
        native_library=native.library_path() if native.load() else None)
    return report


@contextlib.contextmanager
def _inductor_freezing(freezing: bool):
    """``torch._inductor.config.freezing`` for the run (both compiled sides alike)."""
    if not freezing:
        yield
        return
    import torch._inductor.config as inductor_config
    with inductor_config.patch(freezing=True):
        yield


def _run_latency_benchmark(cfg: LatencyConfig, log: Callable[[str], None]) -> Dict[str, object]:
    if cfg.bn_fold not in ('both', 'neither'):
        raise ValueError(f"bn_fold must be 'both' or 'neither', got {cfg.bn_fold!r}")
    fold_sar = cfg.bn_fold == 'both'
    results: List[dict] = []
    per_stage: List[dict] = []
    profiles: List[dict] = []
    checks: List[dict] = []
    flops_cache: Dict[tuple, dict] = {}
    meta = dict(machine_info(), date=datetime.datetime.now().isoformat(timespec='seconds'),
                command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                config={k: v for k, v in asdict(cfg).items()
                        if k not in ('learned_backbone', 'learned_inputs')})
    meta['config']['sizes'] = [_size_key(s) for s in cfg.sizes]
    meta['loadavg_start'] = _loadavg()
    groups, base_stride, alpha, beta = cfg.variant

    # Models are built once (random weights, fixed seed) and reused for every thread count.
    torch.manual_seed(cfg.seed)
    resnets: Dict[int, Dict[str, nn.Module]] = {}
    sars: Dict[int, SARResNet] = {}
    built_sars: Dict[int, SARResNet] = {}
    all_depths = list(cfg.depths)
    for extra in cfg.depths_by_size.values():
        all_depths += [d for d in extra if d not in all_depths]
    for depth in all_depths:
        plain = torchvision_resnet(depth)
        resnets[depth] = {
            f'resnet{depth}': _prepare(plain, False, cfg.channels_last),
            f'resnet{depth}+fold': _prepare(plain, True, cfg.channels_last)}
        sar = build_preset_backbone(preset_name(depth, groups, base_stride, alpha, beta),
                                    patch_grid=cfg.patch_grid)
        built_sars[depth] = sar
        # Folding BN on the SAR side = deploying it (eager rows too: the fast path).
        sars[depth] = _prepare_sar(sar, fold_sar, cfg.channels_last)[0]
    learned = learned_counted = None
    if cfg.learned_backbone is not None:
        learned = _prepare_sar(cfg.learned_backbone, fold_sar, cfg.channels_last)[0]
        learned_counted = cfg.learned_backbone.eval()
    compiled = _compiled_models(cfg, resnets, built_sars, meta) if cfg.compile else {}

    ref_suffix = '+fold' if fold_sar else ''
    profile_jobs: list = []
    for threads in cfg.threads:
        count = set_threads(threads)
        for size in cfg.sizes:
            size = tuple(size)
            key = _size_key(size)
            reps = cfg.reps_by_size.get(key, cfg.reps)
            generator = torch.Generator().manual_seed(cfg.seed)
            x = torch.randn(1, 3, *size, generator=generator)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            patch = _patch_kwargs(cfg, size)
            for depth in cfg.depths_by_size.get(key, cfg.depths):
                sar = sars[depth]
                _set_patches(sar, patch['patch_grid'], patch['patch_size'])
                # FLOPs are counted on the undeployed model (the MAC counter does not
                # know the deployed form: stacked selectors, prepacked weights).
                counted = built_sars[depth].eval()
                _set_patches(counted, patch['patch_grid'], patch['patch_size'])
                cases: 'OrderedDict[str, Callable[[], object]]' = OrderedDict()
                info: Dict[str, dict] = {}
                for name, model in resnets[depth].items():
                    cases[name] = (lambda m=model: m(x))
                    info[name] = dict(model=name, family='resnet', depth=depth,
                                      bn_fold=name.endswith('+fold'), mode=None, rate=None)
                for rate in cfg.rates:
                    for mode, kernel, tag in _mode_kernels(cfg):
                        name = f'sar{depth}-{tag}@{rate:.2f}'
                        cases[name] = _sar_call(sar, x, mode, rate, cfg.seed, kernel)
                        info[name] = dict(model=name, family='sar', depth=depth, bn_fold=fold_sar,
                                          mode=tag, rate=rate, refine_kernel=kernel)
                if cfg.compile:
                    _set_patches(compiled[depth]['deployed'], patch['patch_grid'],
                                 patch['patch_size'])
                    name = f'resnet{depth}+compiled'
                    cases[name] = (lambda m=compiled[depth]['resnet']: m(x))
                    info[name] = dict(model=name, family='resnet', depth=depth, bn_fold=True,
                                      mode=None, rate=None, compiled=True)
                    for rate in cfg.rates:
                        for mode, kernel, tag in _mode_kernels(cfg):
                            name = f'sar{depth}-{tag}@{rate:.2f}+compiled'
                            cases[name] = _sar_call(compiled[depth]['sar'], x, mode, rate,
                                                    cfg.seed, kernel)
                            info[name] = dict(model=name, family='sar', depth=depth, bn_fold=True,
                                              mode=tag, rate=rate, compiled=True,
                                              refine_kernel=kernel)
                learned_here = learned is not None and learned.depth == depth
                if learned_here:
                    lx = (cfg.learned_inputs or {}).get(size, x)
                    if cfg.channels_last:
                        lx = lx.contiguous(memory_format=torch.channels_last)
                    for mode in cfg.modes:
                        name = f'sar{depth}-{mode}@{cfg.learned_name}'
                        cases[name] = _sar_call(learned, lx, mode, None, cfg.seed)
                        info[name] = dict(model=name, family='sar', depth=depth, bn_fold=fold_sar,
                                          mode=mode, rate=cfg.learned_name)

                with torch.inference_mode():
                    if cfg.compile:  # first: the checks below would compile them untimed
                        _time_compilation(cases, info, f'{key} threads={count}', meta, log)
                    if cfg.check and 'dense' in cfg.modes and 'sparse' in cfg.modes:
                        check_rate = 0.5 if 0.5 in cfg.rates else cfg.rates[0]
                        dense_out = _sar_call(sar, x, 'dense', check_rate, cfg.seed)()
                        sparse_out = _sar_call(sar, x, 'sparse', check_rate, cfg.seed)()
                        err = max_relative_error(sparse_out, dense_out)
                        checks.append(dict(size=key, depth=depth, rate=check_rate,
                                           max_rel_error=err))
                        log(f'[check] {key} depth {depth} rate {check_rate}: sparse vs dense '
                            f'max rel error {err:.2e}')
                        if cfg.compile:
                            compiled_out = _sar_call(compiled[depth]['sar'], x, 'sparse',
                                                     check_rate, cfg.seed)()
                            err = max_relative_error(compiled_out, dense_out)
                            checks.append(dict(size=key, depth=depth, rate=check_rate,
                                               max_rel_error=err, case='compiled sparse'))
                            log(f'[check] {key} depth {depth} rate {check_rate}: compiled sparse '
                                f'vs eager dense max rel error {err:.2e}')
                    # FLOPs (paper convention), once per size and depth.
                    fkey = (key, depth)
                    if fkey not in flops_cache:
                        # The rates the override really draws (round(rate * Kh * Kw) patches
                        # per block: a 2x2 grid only knows multiples of 0.25).
                        actual = []
                        for r in cfg.rates:
                            _sar_call(sar, x, 'dense', r, cfg.seed)()
                            actual.append(sar.get_activation_rates().double().mean(0))
                        rates_t = torch.stack(actual)
                        comp = model_complexity(counted, (3, *size), activation_rate=rates_t)
                        resnet_macs = count_macs(resnets[depth][f'resnet{depth}'], (3, *size))[0]
                        entry = dict(resnet=resnet_macs, sar_static=comp['flops_static'],
                                     sar_dense=comp['flops_dense'],
                                     by_rate=dict(zip(cfg.rates, comp['flops_per_image'])),
                                     actual_rate=dict(zip(cfg.rates,
                                                          rates_t.mean(1).tolist())))
                        if learned_here:
                            lx = (cfg.learned_inputs or {}).get(size, x)
                            learned.set_mask_override(None)
                            learned(lx)
                            rates = learned.get_activation_rates()
                            lcomp = model_complexity(learned_counted, (3, *size),
                                                     activation_rate=rates)
                            entry['learned'] = lcomp['flops']
                            entry['learned_rate'] = lcomp['activation_rate']
                            entry['learned_stage_rates'] = [
                                float(rates[:, s].mean()) for s in learned.stage_block_slices()]
                        flops_cache[fkey] = entry
                    flops = flops_cache[fkey]

                    log(f'[time] threads={count} size={key} depth={depth}: {len(cases)} cases x '
                        f'{reps} reps (+{cfg.warmup} warm-up rounds)')
                    cpu_samples: Dict[str, List[float]] = {}
                    samples = interleaved_timing(cases, reps=reps, warmup=cfg.warmup,
                                                 seed=cfg.seed, cpu_samples=cpu_samples)

                    if cfg.per_stage:
                        per_stage += _per_stage(
                            cfg, resnets[depth], sar, learned if learned_here else None, x,
                            (cfg.learned_inputs or {}).get(size, x), key, count, depth,
                            ref_suffix, counted)
                    if cfg.profile and 'sparse' in cfg.modes:
                        # Profiled at the very end: a torch.profiler session leaves
                        # per-op overhead behind that would slow every later case
                        # (the many small ops of the sparse path the most).
                        profile_jobs.append((threads, key, count, depth, sar, x,
                                             patch['patch_grid'], patch['patch_size']))

                stats = {name: summarize(s) for name, s in samples.items()}
                cpu_stats = {name: summarize(s) for name, s in cpu_samples.items()}
                ref_name = f'resnet{depth}{ref_suffix}'
                ref = stats[ref_name]['median_ms']
                plain_ref = stats[f'resnet{depth}']['median_ms']
                fold_ref = stats[f'resnet{depth}+fold']['median_ms']
                for name, st in stats.items():
                    row = dict(info[name], size=key, threads=count, **st)
                    row['ratio_vs_resnet'] = st['median_ms'] / ref
                    row['ratio_vs_resnet_plain'] = st['median_ms'] / plain_ref
                    row['ratio_vs_resnet_fold'] = st['median_ms'] / fold_ref
                    # Robustness checks on a busy machine: the ratio of the
                    # fastest calls, and of the median process CPU time.
                    row['min_ratio_vs_resnet'] = st['min_ms'] / stats[ref_name]['min_ms']
                    row['cpu_median_ms'] = cpu_stats[name]['median_ms']
                    row['cpu_ratio_vs_resnet'] = (cpu_stats[name]['median_ms'] /
                                                  cpu_stats[ref_name]['median_ms'])
                    if row['family'] == 'resnet':
                        row['flops'] = flops['resnet']
                    elif row['rate'] == cfg.learned_name:
                        row['flops'] = flops['learned']
                        row['activation_rate'] = flops['learned_rate']
                        row['stage_rates'] = flops['learned_stage_rates']
                    else:
                        row['flops'] = flops['by_rate'][row['rate']]
                        row['activation_rate'] = flops['actual_rate'][row['rate']]
                    row['flops_ratio'] = row['flops'] / flops['resnet']
                    if row.get('compiled'):
                        # Compiled against compiled: the fair side-by-side of two compiled networks.
                        row['ratio_vs_resnet_compiled'] = \
                            st['median_ms'] / stats[f'resnet{depth}+compiled']['median_ms']
                    if (row['mode'] or '').startswith('sparse'):
                        dense_name = name.replace(f"-{row['mode']}@", '-dense@')
                        if dense_name in stats:
                            row['speedup_vs_dense'] = (stats[dense_name]['median_ms']
                                                       / st['median_ms'])
                    results.append(row)
                log(format_table([r for r in results if r['size'] == key and
                                  r['threads'] == count and r['depth'] == depth], ref_suffix))
    for threads, key, count, depth, sar, x, grid, psize in profile_jobs:
        set_threads(threads)
        _set_patches(sar, grid, psize)
        with torch.inference_mode():
            ops = profile_ops(_sar_call(sar, x, 'sparse', cfg.profile_rate, cfg.seed),
                              reps=cfg.profile_reps)
        profiles.append(dict(size=key, threads=count, depth=depth,
                             case=f'sar{depth}-sparse@{cfg.profile_rate:.2f}', ops=ops))
    meta['loadavg_end'] = _loadavg()
    report = dict(meta=meta, results=results, per_stage=per_stage, profiles=profiles,
                  checks=checks, reference=f'resnet{{depth}}{ref_suffix}')
    report['targets'] = target_summary(report)
    report['headroom'] = target_headroom(report)
    return report


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _per_stage(cfg: LatencyConfig, resnets: Dict[str, nn.Module], sar: SARResNet,
               learned: Optional[SARResNet], x: Tensor, lx: Tensor, key: str, threads: int,
               depth: int, ref_suffix: str, counted: Optional[SARResNet] = None) -> List[dict]:
    """Per-part medians (ms) for the reference ResNet and each SAR case.

    ``counted``: the undeployed twin of ``sar`` whose MACs are counted (the
    MAC counter does not know the deployed form); None: ``sar`` itself.
    """
    counted = sar if counted is None else counted
    out = []
    resnet_name = f'resnet{depth}{ref_suffix}'
    resnet = resnets[resnet_name]
    jobs: List[Tuple[str, Callable[[], object], tuple]] = [
        (resnet_name, lambda: resnet(x), resnet_parts(resnet))]
    shape = tuple(x.shape[1:])
    macs = {resnet_name: part_macs(resnet, resnet_parts(resnet), shape)}
    rates = cfg.per_stage_rates if cfg.per_stage_rates is not None else cfg.rates
    for rate in rates:
        rate_macs = part_macs(counted, sar_parts(counted), shape, rate)
        for mode in cfg.modes:
            name = f'sar{depth}-{mode}@{rate:.2f}'
            jobs.append((name, _sar_call(sar, x, mode, rate, cfg.seed), sar_parts(sar)))
            macs[name] = rate_macs
    if learned is not None:
        for mode in cfg.modes:
            jobs.append((f'sar{depth}-{mode}@{cfg.learned_name}',
                         _sar_call(learned, lx, mode, None, cfg.seed), sar_parts(learned)))
    timers = {name: PartTimer(*parts) for name, _, parts in jobs}
    for name, fn, _ in jobs:  # warm-up
        fn()
    for _ in range(cfg.per_stage_reps):
        for name, fn, _ in jobs:
            with timers[name]:
                timers[name].run(fn)
    for name, _, _ in jobs:
        parts = timers[name].per_call()
        parts_min = timers[name].per_call('min')
        entry = dict(size=key, threads=threads, depth=depth, case=name, parts=dict(parts),
                     grouped=dict(group_parts(parts)), parts_min=dict(parts_min),
                     grouped_min=dict(group_parts(parts_min)), reps=cfg.per_stage_reps)
        if name in macs:
            entry['macs'] = dict(macs[name])
            entry['grouped_macs'] = dict(group_parts(macs[name]))
        out.append(entry)
    return out


# ------------------------------------------------------------------ reports

# The latency targets (BENCHMARKS.md), each measured against ResNet-50 in the same run.
TARGETS = (
    dict(name='224x224, 1 thread: sparse SAR-R50 @0.5 / ResNet-50', size='224x224',
         threads='one', kind='ratio', limit=0.80),
    dict(name='224x224, all threads: sparse SAR-R50 @0.5 / ResNet-50', size='224x224',
         threads='all', kind='ratio', limit=0.80),
    dict(name='800x1216, all threads: sparse SAR-R50 @0.5 / ResNet-50', size='800x1216',
         threads='all', kind='ratio', limit=0.65),
    dict(name='224x224: sparse speed-up over dense-masked @0.5', size='224x224', threads='any',
         kind='speedup', limit=1.2),
    dict(name='800x1216: sparse speed-up over dense-masked @0.5', size='800x1216',
         threads='any', kind='speedup', limit=1.5),
)


def _target_threads(target: dict, threads_seen: Sequence[int]) -> List[int]:
    """The thread counts of a run that a target applies to."""
    if target['threads'] == 'one':
        return [1] if 1 in threads_seen else []
    if target['threads'] == 'all':
        return [max(threads_seen)] if threads_seen and max(threads_seen) > 1 else []
    return list(threads_seen)


def _find_row(rows: Sequence[dict], **fields) -> Optional[dict]:
    return next((r for r in rows if all(r.get(k) == v for k, v in fields.items())), None)


def target_summary(report: Dict[str, object], depth: int = 50, rate: float = 0.5) -> List[dict]:
    """The latency targets against the measured rows (wall-clock medians; CPU-time ratio too)."""
    rows = [r for r in report['results'] if r['depth'] == depth]
    threads_seen = sorted({r['threads'] for r in rows})
    out = []
    for target in TARGETS:
        for threads in _target_threads(target, threads_seen):
            row = _find_row(rows, size=target['size'], threads=threads, mode='sparse', rate=rate)
            if row is None:
                continue
            if target['kind'] == 'ratio':
                value, cpu = row['ratio_vs_resnet'], row['cpu_ratio_vs_resnet']
                met = value <= target['limit']
            else:
                if 'speedup_vs_dense' not in row:
                    continue
                value = row['speedup_vs_dense']
                dense = _find_row(rows, size=target['size'], threads=threads, mode='dense',
                                  rate=rate)
                cpu = dense['cpu_median_ms'] / row['cpu_median_ms']
                met = value >= target['limit']
            out.append(dict(target=target['name'], threads=threads, limit=target['limit'],
                            kind=target['kind'], measured=value, cpu_time_measure=cpu, met=met))
    # Latency falls steadily with the rate: sparse medians ordered by rate, every depth.
    everything = report['results']
    for d, size, threads, compiled in sorted({
            (r['depth'], r['size'], r['threads'], bool(r.get('compiled'))) for r in everything}):
        # One sweep per depth, size, thread count and eager/compiled.
        sweep = sorted((r['rate'], r['median_ms']) for r in everything
                       if r['depth'] == d and r['size'] == size and
                       r['threads'] == threads and r['mode'] == 'sparse' and
                       bool(r.get('compiled')) == compiled and
                       not isinstance(r['rate'], str))
        if len(sweep) < 2:
            continue
        steps = [b[1] - a[1] for a, b in zip(sweep, sweep[1:])]
        label = ' (compiled)' if compiled else ''
        out.append(dict(target=f'{size}, depth {d}: sparse{label} latency falls with the rate',
                        threads=threads, kind='monotone', limit=None,
                        measured=f'{sum(s > 0 for s in steps)}/{len(steps)} steps up',
                        cpu_time_measure=None, met=all(s > 0 for s in steps),
                        sweep_ms={f'{r:.2f}': round(m, 2) for r, m in sweep}))
    return out


def target_headroom(report: Dict[str, object], depth: int = 50, rate: float = 0.5,
                    floor_rate: float = 0.0) -> List[dict]:
    """What each latency target leaves for the patch work, given the rate-0 floor.

    At rate 0 the sparse model refines no patch but runs everything else: the
    stem, base branches, region selectors, the refine branch's dense 1x1
    shortcuts and residual passes, the fusion and stage 4. The target's limit
    minus this floor is the time the patch work of ``rate`` may take; its MACs
    (paper convention, ``rate`` minus the floor) over that time are the
    throughput it would need, set beside the throughput it gets and ResNet's
    own average (its MACs over its median). A floor above the limit means no
    implementation of the patch work can meet the target.

    Needs sparse rows at ``floor_rate`` and ``rate`` (``--rates 0 ... 0.5``).
    """
    rows = [r for r in report['results'] if r['depth'] == depth]
    threads_seen = sorted({r['threads'] for r in rows})
    out = []
    for target in TARGETS:
        for threads in _target_threads(target, threads_seen):
            where = dict(size=target['size'], threads=threads)
            sparse = _find_row(rows, mode='sparse', rate=rate, **where)
            floor = _find_row(rows, mode='sparse', rate=floor_rate, **where)
            dense = _find_row(rows, mode='dense', rate=rate, **where)
            if sparse is None or floor is None or (target['kind'] == 'speedup' and dense is None):
                continue
            resnet_ms = sparse['median_ms'] / sparse['ratio_vs_resnet']
            resnet_macs = sparse['flops'] / sparse['flops_ratio']
            limit_ms = (target['limit'] * resnet_ms if target['kind'] == 'ratio'
                        else dense['median_ms'] / target['limit'])
            patch_macs = sparse['flops'] - floor['flops']
            budget_ms = limit_ms - floor['median_ms']
            spent_ms = sparse['median_ms'] - floor['median_ms']
            entry = dict(target=target['name'], threads=threads, limit_ms=limit_ms,
                         floor_ms=floor['median_ms'], floor_ratio=floor['ratio_vs_resnet'],
                         patch_mmacs=patch_macs / 1e6, budget_ms=budget_ms, spent_ms=spent_ms,
                         resnet_gmacs=resnet_macs / resnet_ms / 1e6,
                         spent_gmacs=patch_macs / spent_ms / 1e6 if spent_ms > 0 else None,
                         needed_gmacs=patch_macs / budget_ms / 1e6 if budget_ms > 0 else None)
            entry['needed_vs_resnet'] = (None if entry['needed_gmacs'] is None
                                         else entry['needed_gmacs'] / entry['resnet_gmacs'])
            out.append(entry)
    return out


def format_summary(report: Dict[str, object], rate: float = 0.5) -> str:
    """One line per (depth, size, threads): ResNet, SAR dense/sparse at ``rate``, their ratios."""
    results = report['results']
    suffix = '+fold' if report['meta']['config']['bn_fold'] == 'both' else ''
    keys = []
    for r in results:
        k = (r['depth'], r['size'], r['threads'])
        if k not in keys:
            keys.append(k)
    lines = [f'| depth | size | threads | ResNet ms (median / min) | SAR dense@{rate} ms | '
             f'SAR sparse@{rate} ms | sparse / ResNet (median / min) | dense / ResNet | '
             'sparse vs dense | FLOPs ratio |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for depth, size, threads in sorted(keys, key=lambda k: (k[0], k[1] != '224x224', k[2])):
        rows = {r['model']: r for r in results if (r['depth'], r['size'], r['threads']) ==
                (depth, size, threads)}
        ref = rows.get(f'resnet{depth}{suffix}')
        sparse = rows.get(f'sar{depth}-sparse@{rate:.2f}')
        dense = rows.get(f'sar{depth}-dense@{rate:.2f}')
        if ref is None or (sparse is None and dense is None):
            continue

        def ms(row):
            return '' if row is None else f"{row['median_ms']:.1f}"
        lines.append(
            f"| {depth} | {size} | {threads} | {ref['median_ms']:.1f} / {ref['min_ms']:.1f} | "
            f"{ms(dense)} | {ms(sparse)} | "
            + (f"{sparse['ratio_vs_resnet']:.3f} / {sparse['min_ratio_vs_resnet']:.3f}"
               if sparse else '') + ' | '
            + (f"{dense['ratio_vs_resnet']:.3f}" if dense else '') + ' | '
            + (f"{sparse['speedup_vs_dense']:.2f}x" if sparse and 'speedup_vs_dense' in sparse
               else '') + ' | '
            + f"{(sparse or dense)['flops_ratio']:.3f} |")
    return '\n'.join(lines) + '\n'


def format_targets(summary: Sequence[dict]) -> str:
    lines = ['| target | threads | limit | measured (wall median) | CPU-time measure | met |',
             '|---|---|---|---|---|---|']
    for t in summary:
        measured = t['measured'] if isinstance(t['measured'], str) else f"{t['measured']:.3f}"
        cpu = '' if t['cpu_time_measure'] is None else f"{t['cpu_time_measure']:.3f}"
        limit = '' if t['limit'] is None else (
            f"<= {t['limit']}" if t['kind'] == 'ratio' else f">= {t['limit']}")
        lines.append(f"| {t['target']} | {t['threads']} | {limit} | {measured} | {cpu} | "
                     f"{'yes' if t['met'] else 'no'} |")
    return '\n'.join(lines) + '\n'


def _num(value: Optional[float], digits: int = 1) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def format_headroom(entries: Sequence[dict]) -> str:
    lines = ['| target | threads | floor (rate 0) ms / vs ResNet | limit ms | left for the patch '
             'work ms | patch work now ms | patch MMACs | GMAC/s needed | GMAC/s now | '
             "ResNet's GMAC/s | needed / ResNet's |",
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for e in entries:
        verdict = ('floor above the limit' if e['needed_vs_resnet'] is None
                   else f"{e['needed_vs_resnet']:.2f}x")
        lines.append(
            f"| {e['target']} | {e['threads']} | {e['floor_ms']:.1f} / {e['floor_ratio']:.3f} | "
            f"{e['limit_ms']:.1f} | {e['budget_ms']:.1f} | {e['spent_ms']:.1f} | "
            f"{e['patch_mmacs']:.0f} | {_num(e['needed_gmacs'])} | {_num(e['spent_gmacs'])} | "
            f"{e['resnet_gmacs']:.1f} | {verdict} |")
    return '\n'.join(lines) + '\n'


def format_table(rows: Sequence[dict], ref_suffix: str = '') -> str:
    """A markdown table of timing rows (one size, thread count and depth)."""
    if not rows:
        return ''
    first = rows[0]
    compiled = any(r.get('compiled') for r in rows)
    head = (f"\n### {first['size']}, {first['threads']} thread(s), depth {first['depth']} "
            f"(ratios vs resnet{first['depth']}{ref_suffix})\n\n"
            '| case | rate | median ms | IQR ms | latency ratio | FLOPs ratio | sparse vs dense '
            '| min-time ratio | CPU-time ratio |' + (' vs compiled ResNet |' if compiled else '')
            + '\n|---|---|---|---|---|---|---|---|---|' + ('---|' if compiled else '') + '\n')
    lines = []
    for r in rows:
        rate = '' if r['rate'] is None else _fmt_rate(r['rate'])
        actual = r.get('activation_rate')
        if actual is not None and (isinstance(r['rate'], str) or abs(actual - r['rate']) > 0.005):
            rate = f"{rate} ({actual:.2f})"  # the rate the masks really have
        speed = f"{r['speedup_vs_dense']:.2f}x" if 'speedup_vs_dense' in r else ''
        lines.append(f"| {r['model']} | {rate} | {r['median_ms']:.1f} | "
                     f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f} | {r['ratio_vs_resnet']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {speed} | {r['min_ratio_vs_resnet']:.3f} | "
                     f"{r['cpu_ratio_vs_resnet']:.3f} |")
        if compiled:
            ratio = r.get('ratio_vs_resnet_compiled')
            lines[-1] += f" {ratio:.3f} |" if ratio is not None else ' |'
    return head + '\n'.join(lines) + '\n'


def format_per_stage(entries: Sequence[dict]) -> str:
    """Markdown tables of per-part times: one per size/threads/depth, cases as columns."""
    out = []
    keys = []
    for e in entries:
        k = (e['size'], e['threads'], e['depth'])
        if k not in keys:
            keys.append(k)
    for size, threads, depth in keys:
        group = [e for e in entries
                 if (e['size'], e['threads'], e['depth']) == (size, threads, depth)]
        resnet = [e for e in group if e['case'].startswith('resnet')]
        sar = [e for e in group if not e['case'].startswith('resnet')]
        if resnet:
            rows = '\n'.join(f'| {k} | {_med_min(resnet[0], "grouped", k)} |'
                             for k in resnet[0]['grouped'])
            out.append(f'\n#### per stage: {size}, {threads} thread(s), {resnet[0]["case"]}\n\n'
                       '| part | ms (median / min) |\n|---|---|\n' + rows + '\n')
        if sar:
            out.append(f'\n#### per stage (ms, median / min, summed over the 3 SAR stages): '
                       f'{size}, {threads} thread(s), depth {depth}\n\n'
                       + _cases_table(sar, 'grouped') + '\n')
            if all('grouped_macs' in e for e in group):
                out.append(_efficiency_table(group, size, threads, depth))
            # Also per SAR stage, for the sparse cases.
            out.append(f'\n<details><summary>per SAR stage ({size}, {threads} thread(s), depth '
                       f'{depth})</summary>\n\n' + _cases_table(sar, 'parts')
                       + '\n\n</details>\n')
    return ''.join(out)


def _cases_table(entries: Sequence[dict], key: str) -> str:
    """Markdown table: one row per part (in first-seen order), one column per case."""
    labels: List[str] = []
    for entry in entries:
        labels += [label for label in entry[key] if label not in labels]
    header = '| part | ' + ' | '.join(e['case'] for e in entries) + ' |\n'
    header += '|---|' + '---|' * len(entries) + '\n'
    return header + '\n'.join(
        f'| {label} | ' + ' | '.join(_med_min(e, key, label) for e in entries) + ' |'
        for label in labels)


def _efficiency_table(group: Sequence[dict], size: str, threads: int, depth: int) -> str:
    """MACs per part and the rate they run at (GMAC/s from the fastest call)."""
    labels: List[str] = []
    for e in group:
        for label in e['grouped_macs']:
            if label not in labels and label != 'other':
                labels.append(label)
    header = '| part | ' + ' | '.join(e['case'] for e in group) + ' |\n'
    header += '|---|' + '---|' * len(group) + '\n'

    def cell(e: dict, label: str) -> str:
        macs = e['grouped_macs'].get(label)
        if macs is None:
            return ''
        low = e.get('grouped_min', e['grouped']).get(label, 0.0)
        speed = f' @ {macs / 1e6 / low:.0f}' if low > 0 and macs > 0 else ''
        return f'{macs / 1e6:.0f}{speed}'
    body = '\n'.join(f'| {label} | ' + ' | '.join(cell(e, label) for e in group) + ' |'
                     for label in labels)
    return (f'\n#### MMACs per part @ GMAC/s (MACs / fastest time): {size}, {threads} thread(s), '
            f'depth {depth}\n\n' + header + body + '\n')


def _med_min(entry: dict, key: str, label: str) -> str:
    med = entry[key].get(label, 0.0)
    low = entry.get(key + '_min', {}).get(label)
    return f'{med:.1f}' if low is None else f'{med:.1f} / {low:.1f}'


def format_profiles(profiles: Sequence[dict]) -> str:
    out = []
    for p in profiles:
        out.append(f"\n#### top ops: {p['case']}, {p['size']}, {p['threads']} thread(s)\n\n"
                   '| op | self ms / forward | calls / forward | share |\n|---|---|---|---|\n' +
                   '\n'.join(f"| {o['op']} | {o['self_ms_per_call']:.2f} | "
                             f"{o['calls_per_forward']:.0f} | {o['share']:.1%} |"
                             for o in p['ops']) + '\n')
    return ''.join(out)


_CONV_BACKEND_TEXT = {
    'default': "PyTorch's default dispatch (THNN or oneDNN per conv)",
    'onednn': 'oneDNN for every conv, both sides (--conv-backend onednn)',
}


def format_report(report: Dict[str, object]) -> str:
    """The whole markdown report: machine, command, tables, per-stage and profiles."""
    meta = report['meta']
    cfg = meta['config']
    lines = [
        '# SAR-ResNet latency benchmark\n',
        f"- machine: {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs; torch "
        f"{meta['torch']}, torchvision {meta['torchvision']}, Python {meta['python']}",
        f"- date: {meta['date']}; code: sar_backbones {meta.get('code', 'unknown')}",
        f"- command: `{meta['command']}`",
        f"- batch 1, float32, backbone only (stem + 4 stages, no head), "
        f"BN folding: {cfg['bn_fold']} (ratios are against resnet{{d}}"
        f"{'+fold' if cfg['bn_fold'] == 'both' else ''}), channels-last: "
        f"{'both' if cfg['channels_last'] else 'neither'}; conv kernels: "
        f"{_CONV_BACKEND_TEXT[cfg.get('conv_backend', 'default')]}; the sparse refine path always "
        'runs on BN-folded weights (part of the method)',
        f"- reps: {cfg['reps']} (overrides {cfg['reps_by_size'] or 'none'}), warm-up rounds: "
        f"{cfg['warmup']}, interleaved shuffled rounds; median and inter-quartile range",
        f"- environment: {meta.get('env') or 'defaults'} ({meta.get('torch_parallel_info', '')})",
        f"- load average (1/5/15 min) at start {meta.get('loadavg_start')}, at end "
        f"{meta.get('loadavg_end')} on {meta['logical_cpus']} CPUs",
        '- latency ratio: median wall time / the reference\'s median; min-time ratio: fastest '
        'call / fastest reference call; CPU-time ratio: median process CPU time / the '
        "reference's (with 1 thread it excludes time spent waiting for a busy CPU; with "
        'more threads it measures total work, not latency); FLOPs ratio: paper-convention MACs',
        f"- SAR variant G{cfg['variant'][0]}s{cfg['variant'][1]}a{cfg['variant'][2]}"
        f"b{cfg['variant'][3]}, patch mode {cfg['patch_mode']} (grid {tuple(cfg['patch_grid'])} "
        f"at 224, size {tuple(cfg['patch_size'])} px otherwise), random masks via "
        'set_mask_override: round(rate x Kh x Kw) patches per image, group and block, so on the '
        "2x2 grid of stage 3 at 224 the rate steps by 0.25 (the mean rate the masks really have "
        'is given in brackets where it differs; FLOPs use it)',
    ]
    kernel = meta.get('refine_kernel')
    if kernel:
        others = ', '.join(f"'sparse[{k}]'" for k in kernel['kernels'][1:])
        lines.append(
            f"- sparse refine op (SAR_REFINE_KERNEL): '{kernel['kernels'][0]}' for the sparse "
            f"rows{'; ' + others + ' rows time the others' if others else ''}; native library "
            f"{'built' if kernel['native_built'] else 'NOT built (auto = PyTorch fallback)'}")
    for check in report.get('checks', []):
        lines.append(f"- check {check['size']} depth {check['depth']} rate {check['rate']}: "
                     f"{check.get('case', 'sparse')} vs dense max rel error "
                     f"{check['max_rel_error']:.1e}")
    if cfg.get('compile'):
        deploy = ', '.join(f'depth {d}: {t:.2f} s' for d, t in meta.get('deploy_s', {}).items())
        compile_times = ', '.join(f'{k}: {t:.1f} s' for k, t in meta.get('compile_s', {}).items())
        freezing = 'on' if cfg.get('freezing') else 'off'
        lines.append(f"- torch.compile (inductor, freezing {freezing})"
                     ' on both sides: ResNet with BN folded, SAR deployed (switch_to_deploy); '
                     "'+compiled' rows, last column: latency / compiled ResNet's latency")
        lines.append(f'- deploy time: {deploy}; compile time (first call): {compile_times}')
    lines.append('')
    lines.append('## Summary (rate 0.5)\n')
    lines.append(format_summary(report))
    summary = target_summary(report)
    if summary:
        lines.append('## Latency targets (SAR-ResNet50 G2s2a2b1 at rate 0.5; rate sweeps)\n')
        lines.append(format_targets(summary))
    headroom = target_headroom(report)
    if headroom:
        lines.append('### What the targets leave for the patch work\n')
        lines.append('The floor is the sparse model at rate 0 (no patch refined: everything but '
                     'the patch work); the patch work at 0.5 may take the limit minus the floor. '
                     "GMAC/s: the patch work's paper-convention MACs (rate 0.5 minus rate 0) per "
                     "second, needed and measured, beside ResNet-50's whole-network average. "
                     'Only a target whose floor is below its limit can be met by a faster '
                     'sparse path.\n')
        lines.append(format_headroom(headroom))
    results = report['results']
    keys = []
    for r in results:
        k = (r['threads'], r['size'], r['depth'])
        if k not in keys:
            keys.append(k)
    suffix = '+fold' if cfg['bn_fold'] == 'both' else ''
    for threads, size, depth in keys:
        lines.append(format_table([r for r in results if (r['threads'], r['size'], r['depth']) ==
                                   (threads, size, depth)], suffix))
    if report.get('per_stage'):
        lines.append('\n## Per stage\n')
        lines.append(format_per_stage(report['per_stage']))
    if report.get('profiles'):
        lines.append('\n## Op profiles\n')
        lines.append(format_profiles(report['profiles']))
    return '\n'.join(lines) + '\n'


def save_report(report: Dict[str, object], json_path: str, md_path: Optional[str] = None) -> None:
    """Write the JSON results (and the markdown report)."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, 'w') as f:
        json.dump(report, f, indent=1, default=_json_default)
    if md_path:
        with open(md_path, 'w') as f:
            f.write(format_report(report))


def _json_default(obj):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)
