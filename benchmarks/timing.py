"""Timing, machine records and report files shared by the benchmark scripts.

Timing on a shared CPU is noisy, so every comparison is made within one run:
the cases being compared are timed in interleaved rounds (each round calls
every case once, in a shuffled order) on the same input, and the reported
figure is the median with its inter-quartile range. Ratios are formed from
medians of the same run.
"""
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.nn.modules.utils import _pair

import sar_backbones
from sar_backbones.version import __version__

# ------------------------------------------------------------------ statistics


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min, max, mean and std of timings given in seconds, in milliseconds."""
    if not samples:
        raise ValueError('no timing samples')
    ms = sorted(s * 1e3 for s in samples)
    if len(ms) >= 2:
        quartiles = statistics.quantiles(ms, n=4, method='inclusive')
        p25, p75 = quartiles[0], quartiles[2]
    else:
        p25 = p75 = ms[0]
    return {
        'median_ms': statistics.median(ms),
        'p25_ms': p25,
        'p75_ms': p75,
        'min_ms': ms[0],
        'max_ms': ms[-1],
        'mean_ms': statistics.fmean(ms),
        'std_ms': statistics.stdev(ms) if len(ms) > 1 else 0.0,
        'reps': len(ms),
    }


def interleaved_timing(cases: 'OrderedDict[str, Callable[[], object]]', reps: int,
                       warmup: int = 2, seed: int = 0,
                       progress: Optional[Callable[[int], None]] = None,
                       cpu_samples: Optional[Dict[str, List[float]]] = None
                       ) -> Dict[str, List[float]]:
    """Time every case ``reps`` times in interleaved, shuffled rounds.

    Each round calls every case once, in a random order (seeded), so that
    slow drifts of the machine (other processes, frequency changes) hit all
    cases alike. ``warmup`` untimed rounds come first. Returns wall seconds per
    call; if ``cpu_samples`` is given it is filled with the process CPU seconds
    of each call (``time.process_time``), which on a busy machine excludes the
    time the process waited to be scheduled (with one thread it is the
    latency an idle core would give; with several it sums over the threads).
    """
    names = list(cases)
    rng = random.Random(seed)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    if cpu_samples is not None:
        for name in names:
            cpu_samples[name] = []
    for index in range(reps):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            fn = cases[name]
            cpu_start = time.process_time()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
            if cpu_samples is not None:
                cpu_samples[name].append(time.process_time() - cpu_start)
        if progress is not None:
            progress(index)
    return samples


def set_threads(threads: int) -> int:
    """``torch.set_num_threads``; 0 means all logical CPUs. Returns the count set."""
    count = threads if threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(count)
    return count


def parse_size(text: str) -> Tuple[int, int]:
    """``'224'`` or ``'800x1216'`` (height x width)."""
    parts = text.lower().replace('*', 'x').split('x')
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) != 2:
        raise ValueError(f'size must be H or HxW, got {text!r}')
    return int(parts[0]), int(parts[1])


def max_relative_error(a: Iterable[Tensor], b: Iterable[Tensor]) -> float:
    """Largest ``max|a-b| / max|b|`` over paired outputs."""
    worst = 0.0
    for x, y in zip(a, b):
        scale = float(y.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


# ------------------------------------------------------------- the machine


def machine_info() -> Dict[str, object]:
    """CPU model (``lscpu``), core count, library versions, threads and the code's commit."""
    model = platform.processor() or 'unknown'
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        'cpu_model': model,
        'logical_cpus': os.cpu_count(),
        'torch': torch.__version__,
        'torchvision': torchvision.__version__,
        'python': platform.python_version(),
        'platform': platform.platform(),
        'default_threads': torch.get_num_threads(),
        'mkldnn': torch.backends.mkldnn.is_available(),
        'env': {k: os.environ[k] for k in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS', 'GOMP_SPINCOUNT',
                                           'KMP_BLOCKTIME', 'MKL_NUM_THREADS', 'MALLOC_MMAP_MAX_',
                                           'MALLOC_TRIM_THRESHOLD_', 'LD_PRELOAD')
                if k in os.environ},
        'torch_parallel_info': _parallel_backend(),
        'code': code_version(),
        'openmmlab': _openmmlab_versions(),
    }


def code_version() -> str:
    """``sar_backbones`` version and, in a git checkout, its commit (``+dirty``: code modified)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sar_backbones.__file__)))
    try:
        commit = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'],
                                capture_output=True, text=True, timeout=10)
        # Only the code counts: benchmark results written into the checkout do not.
        status = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no',
                                 '--', 'sar_backbones', 'tools', 'configs', 'benchmarks',
                                 ':(exclude)benchmarks/results'],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return __version__
    if commit.returncode != 0:
        return __version__
    dirty = '+dirty' if status.stdout.strip() else ''
    return f'{__version__} (commit {commit.stdout.strip()}{dirty})'


def _openmmlab_versions() -> Dict[str, str]:
    """Installed versions of the OpenMMLab libraries (read from their metadata, not imported)."""
    versions = {}
    for name in ('mmengine', 'mmcv', 'mmdet', 'mmsegmentation', 'mmpretrain'):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _parallel_backend() -> str:
    try:
        lines = torch.__config__.parallel_info().splitlines()
        return '; '.join(line.strip() for line in lines
                         if line.strip().startswith(('ATen parallel backend', 'OpenMP', 'MKL')))
    except Exception:  # noqa: BLE001 - informational only
        return ''


# ------------------------------------------------------------- report files


def save_script_report(script: str, argv: Optional[Sequence[str]], out: str, rows: list,
                       render: Callable[[dict], str], **settings) -> dict:
    """Save a benchmark script's ``{'meta', 'rows'}`` report as JSON and markdown; print it.

    Args:
        script (str): The script's path in the repository, for the recorded command.
        argv (Sequence[str], optional): Its arguments (None: ``sys.argv[1:]``).
        out (str): JSON path; the markdown goes next to it (``.md``).
        rows (list): The measured rows.
        render (Callable): Report -> markdown.
        **settings: Run settings recorded in ``meta`` next to :func:`machine_info`.

    Returns:
        dict: The report.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    meta = dict(machine_info(), **settings,
                date=datetime.datetime.now().isoformat(timespec='seconds'),
                command=' '.join([f'python {script}'] + arguments))
    report = {'meta': meta, 'rows': rows}
    with open(out, 'w') as f:
        json.dump(report, f, indent=1)
    markdown = render(report)
    with open(os.path.splitext(out)[0] + '.md', 'w') as f:
        f.write(markdown)
    print(markdown)
    return report


def script_report_header(meta: dict, title: str, machine_extra: str = '') -> List[str]:
    """Markdown title, machine, date, code and command lines of a benchmark script's report."""
    return [f'# {title}\n',
            f"- machine: {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs; torch "
            f"{meta['torch']}{machine_extra}",
            f"- date: {meta['date']}; code: sar_backbones {meta['code']}",
            f"- command: `{meta['command']}`"]


# ------------------------------------------------------------- kernels and ops


def profile_ops(fn: Callable[[], object], reps: int = 3, top: int = 15,
                warmup: int = 1) -> List[Dict[str, object]]:
    """The ``top`` aten ops by self CPU time per call, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    rows = []
    for event in prof.key_averages():
        rows.append({'op': event.key, 'self_ms_per_call': event.self_cpu_time_total / 1e3 / reps,
                     'calls_per_forward': event.count / reps})
    rows.sort(key=lambda r: r['self_ms_per_call'], reverse=True)
    total = sum(r['self_ms_per_call'] for r in rows)
    for row in rows:
        row['share'] = row['self_ms_per_call'] / total if total else 0.0
    return rows[:top]


CONV_BACKENDS = ('default', 'onednn')


@contextlib.contextmanager
def conv_backend(name: str):
    """Which kernels float32 CPU convolutions use while the context is open.

    ``'default'``: PyTorch's own choice, which on batch 1 sends 1x1 stride-1
    convs on one thread and 3x3 convs on small maps to its THNN im2col + gemm
    kernel and the rest to oneDNN. ``'onednn'``: every conv to oneDNN
    (``aten::mkldnn_convolution``, weights reordered on each call as in the
    default path), for both networks alike, through ``F.conv2d``, which
    ``nn.Conv2d`` and the sparse refine path call.
    """
    if name not in CONV_BACKENDS:
        raise ValueError(f'conv backend must be one of {CONV_BACKENDS}, got {name!r}')
    if name == 'default':
        yield
        return
    default_conv2d = F.conv2d

    def onednn_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if input.device.type != 'cpu' or input.dtype != torch.float32 or isinstance(padding, str):
            return default_conv2d(input, weight, bias, stride, padding, dilation, groups)
        return torch.ops.aten.mkldnn_convolution(input, weight, bias, _pair(padding),
                                                 _pair(stride), _pair(dilation), groups)

    F.conv2d = onednn_conv2d
    try:
        yield
    finally:
        F.conv2d = default_conv2d
