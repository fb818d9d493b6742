"""Named parts of the backbones the latency benchmark times, their MACs and time per part.

:func:`sar_parts` and :func:`resnet_parts` name the modules of a SAR-ResNet and
of the reference ResNet (stem, per-stage base / select / refine / fusion, ...);
:class:`PartTimer` times them with forward hooks during a forward pass,
:func:`part_macs` counts their multiply-accumulates in the paper's convention,
and :func:`group_parts` sums a part over the SAR stages.
"""
import contextlib
import statistics
import time
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from sar_backbones.analysis import count_macs
from sar_backbones.models.backbones import SARResNet

# (timed leaves, containers): (label, module) pairs for :class:`PartTimer`.
Parts = Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, nn.Module]]]


def sar_parts(backbone: SARResNet) -> Parts:
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


def resnet_parts(backbone: nn.Module) -> Parts:
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
    charged ``rate x`` their dense cost, as in :func:`sar_backbones.analysis.model_complexity`.
    """
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
