"""Latency measurement helpers: interleaved timing, BN folding, per-part timing, op profiles.

Timing on a shared CPU is noisy, so every comparison is made within one run:
the models being compared are timed in interleaved rounds (each round calls
every case once, in a shuffled order) on the same input, and the reported
figure is the median with its inter-quartile range. Ratios are formed from
medians of the same run.
"""
import contextlib
import copy
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from ..models.backbones import SARResNet
from ..version import __version__

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


# ------------------------------------------------------------- the machine


def machine_info() -> Dict[str, object]:
    """CPU model (``lscpu``), core count, torch version and default thread count."""
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
    }


def save_script_report(script: str, argv: Optional[Sequence[str]], out: str, rows: list,
                       render: Callable[[dict], str], **settings) -> dict:
    """Save a benchmark script's ``{'meta', 'rows'}`` report as JSON and markdown; print the markdown.

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


def code_version() -> str:
    """``sar_backbones`` version and, in a git checkout, its commit (``+dirty``: code modified)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'],
                                capture_output=True, text=True, timeout=10)
        # Only the code counts: benchmark results written into the checkout do not.
        status = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no',
                                 '--', 'sar_backbones', 'tools', 'configs'],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return __version__
    if commit.returncode != 0:
        return __version__
    dirty = '+dirty' if status.stdout.strip() else ''
    return f'{__version__} (commit {commit.stdout.strip()}{dirty})'


def _parallel_backend() -> str:
    try:
        lines = torch.__config__.parallel_info().splitlines()
        return '; '.join(line.strip() for line in lines
                         if line.strip().startswith(('ATen parallel backend', 'OpenMP', 'MKL')))
    except Exception:  # noqa: BLE001 - informational only
        return ''


# ------------------------------------------------------------- the models


class TorchvisionBackbone(nn.Module):
    """A torchvision ResNet without its pooling and FC head: returns the 4 stage outputs.

    The same output contract as :class:`SARResNet` with ``out_indices=(0, 1, 2, 3)``,
    so that the two backbones are timed on equal terms.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'):
            self.add_module(name, getattr(resnet, name))

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return tuple(outs)


def build_resnet_backbone(depth: int) -> TorchvisionBackbone:
    """torchvision ResNet-``depth`` (random weights) as a backbone, eval mode."""
    builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
                50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
    if depth not in builders:
        raise ValueError(f'no torchvision ResNet-{depth}; choose from {sorted(builders)}')
    return TorchvisionBackbone(builders[depth]()).eval()


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


def _fold_into(conv: nn.Conv2d, norm: _BatchNorm) -> None:
    with torch.no_grad():
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)


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
        last_conv: Optional[Tuple[str, nn.Conv2d]] = None
        for name, child in list(module.named_children()):
            if id(child) in skip:
                last_conv = None
                continue
            if isinstance(child, _BatchNorm) and last_conv is not None:
                _fold_into(last_conv[1], child)
                setattr(module, name, nn.Identity())
                last_conv = None
            elif isinstance(child, nn.Conv2d):
                last_conv = (name, child)
            else:
                visit(child)
    visit(model)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)`` (a copy)."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


# ------------------------------------------------------------ per-part timing


def sar_parts(backbone: SARResNet) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, nn.Module]]]:
    """(timed leaves, containers) for :class:`PartTimer` on a SAR-ResNet.

    Leaves: the stem, per SAR stage ``s{i}.entry``, ``s{i}.base`` (pooling and
    base blocks), ``s{i}.select`` (region selectors), ``s{i}.refine`` (refine
    blocks, when they are called as modules: the dense path), ``s{i}.align``,
    ``s{i}.fusion``, ``s{i}.exit``, and ``layer4``. The container ``s{i}.refine``
    collects what the stage does outside its leaves: in the sparse path that is
    the whole gather-conv-scatter refine branch (plus the mask override when set).
    """
    leaves: List[Tuple[str, nn.Module]] = []
    if backbone.deep_stem:
        leaves.append(('stem', backbone.stem))
    else:
        leaves += [('stem', backbone.conv1), ('stem', backbone.bn1), ('stem', backbone.relu)]
    leaves.append(('stem', backbone.maxpool))
    containers = []
    for index, stage in enumerate(backbone.sar_stages, start=1):
        prefix = f's{index}.'
        if stage.entry is not None:
            leaves.append((prefix + 'entry', stage.entry))
        if stage.base_pool is not None:
            leaves.append((prefix + 'base', stage.base_pool))
        leaves += [(prefix + 'base', b) for b in stage.base_blocks]
        leaves.append((prefix + 'select', stage.selectors))  # all at once, as they run
        leaves += [(prefix + 'refine', b) for b in stage.refine_blocks]
        for align in (stage.base_align, stage.refine_align):
            if align is not None:
                leaves.append((prefix + 'align', align))
        leaves.append((prefix + 'fusion', stage.fusion_gate))
        if stage.exit is not None:
            leaves.append((prefix + 'exit', stage.exit))
        containers.append((prefix + 'refine', stage))
    leaves.append(('layer4', backbone.layer4))
    return leaves, containers


def resnet_parts(backbone: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, nn.Module]]]:
    """(timed leaves, containers) for :class:`PartTimer` on a :class:`TorchvisionBackbone`."""
    leaves = [('stem', backbone.conv1), ('stem', backbone.bn1), ('stem', backbone.relu),
              ('stem', backbone.maxpool)]
    leaves += [(f'layer{i}', getattr(backbone, f'layer{i}')) for i in range(1, 5)]
    return leaves, []


class PartTimer:
    """Wall time per named part of a forward pass, with forward hooks.

    ``leaves`` are timed directly; a ``container`` is charged its own time
    minus that of the leaves called inside it (code that is not a module call,
    such as the sparse refine path). Parts repeat their label to be summed.
    Use as a context manager around a number of forward calls; ``per_call()``
    gives the median per call of each part in milliseconds.
    """

    def __init__(self, leaves: Sequence[Tuple[str, nn.Module]],
                 containers: Sequence[Tuple[str, nn.Module]] = ()) -> None:
        self.leaves = list(leaves)
        self.containers = list(containers)
        self._handles: list = []
        self._stack: List[List[float]] = []  # [start, child time] per open container
        self._open: Dict[int, float] = {}
        self._current: Dict[str, float] = defaultdict(float)
        self.calls: List[Dict[str, float]] = []

    def _pre_leaf(self, module, args) -> None:
        self._open[id(module)] = time.perf_counter()

    def _post_leaf(self, label: str):
        def hook(module, args, output) -> None:
            elapsed = time.perf_counter() - self._open.pop(id(module))
            self._current[label] += elapsed
            if self._stack:
                self._stack[-1][1] += elapsed
        return hook

    def _pre_container(self, module, args) -> None:
        self._stack.append([time.perf_counter(), 0.0])

    def _post_container(self, label: str):
        def hook(module, args, output) -> None:
            start, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self._current[label] += elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed
        return hook

    def __enter__(self) -> 'PartTimer':
        for label, module in self.containers:
            self._handles.append(module.register_forward_pre_hook(self._pre_container))
            self._handles.append(module.register_forward_hook(self._post_container(label)))
        for label, module in self.leaves:
            self._handles.append(module.register_forward_pre_hook(self._pre_leaf))
            self._handles.append(module.register_forward_hook(self._post_leaf(label)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, fn: Callable[[], object]) -> float:
        """Call ``fn`` once, recording its parts; returns its total wall time (s)."""
        self._current = defaultdict(float)
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
        record = dict(self._current)
        record['total'] = total
        record['other'] = total - sum(v for k, v in self._current.items())
        self.calls.append(record)
        return total

    def per_call(self, stat: str = 'median') -> 'OrderedDict[str, float]':
        """Milliseconds per call of each part (and ``total``, ``other``): median or min over calls.

        On a shared machine the minimum estimates the undisturbed cost of a part.
        """
        if stat not in ('median', 'min'):
            raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
        reduce = statistics.median if stat == 'median' else min
        labels: List[str] = []
        for label, _ in list(self.leaves) + list(self.containers):
            if label not in labels:
                labels.append(label)
        labels += ['other', 'total']
        return OrderedDict(
            (label, reduce(call.get(label, 0.0) for call in self.calls) * 1e3)
            for label in labels)


def part_macs(backbone: nn.Module, parts: Tuple[list, list], input_shape: Sequence[int],
              rate: Optional[float] = None) -> 'OrderedDict[str, float]':
    """MACs of one image per part label (paper convention), for :class:`PartTimer` parts.

    Every counted layer is charged to the leaf (or container) it runs in. For a
    SAR-ResNet the convolutions of the refine blocks (not their shortcuts) are
    charged ``rate x`` their dense cost, as in :func:`~.complexity.model_complexity`.
    """
    from .complexity import count_macs
    leaves, containers = parts
    label_of: Dict[int, str] = {}
    for label, module in list(containers) + list(leaves):  # leaves override containers
        for sub in module.modules():
            label_of[id(sub)] = label
    scale: Dict[int, float] = {}
    if isinstance(backbone, SARResNet):
        for stage in backbone.sar_stages:
            for block in stage.refine_blocks:
                for conv, _ in block.convs_and_norms:
                    scale[id(conv)] = 1.0 if rate is None else float(rate)
    labels = {id(m): i for i, m in enumerate(backbone.modules())}
    modules = {i: m for m, i in ((m, labels[id(m)]) for m in backbone.modules())}
    # On the dense path every refine conv is called once.
    settings = backbone.temporary_settings(training=False, inference_mode='dense', mask_rate=1.0) \
        if isinstance(backbone, SARResNet) else contextlib.nullcontext()
    with settings:
        totals = count_macs(backbone, input_shape, bucket=lambda m: labels[id(m)])
    out: 'OrderedDict[str, float]' = OrderedDict()
    for label, _ in list(leaves) + list(containers):
        out.setdefault(label, 0.0)
    for index, macs in totals.items():
        module = modules[index]
        label = label_of.get(id(module), 'other')
        out[label] = out.get(label, 0.0) + macs * scale.get(id(module), 1.0)
    out['total'] = sum(v for k, v in out.items())
    return out


def group_parts(parts: Dict[str, float]) -> 'OrderedDict[str, float]':
    """Sum ``s{i}.<kind>`` parts over the stages: stem, base, select, refine, ... (ms)."""
    grouped: 'OrderedDict[str, float]' = OrderedDict()
    for label, value in parts.items():
        key = label.split('.', 1)[1] if label.startswith('s') and '.' in label else label
        grouped[key] = grouped.get(key, 0.0) + value
    return grouped


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
