"""Batch-1 CUDA latency: ResNet-50 against SAR-ResNet50 dense and sparse (issue 18, point 5).

For every input size and precision (fp32, fp16 autocast), one interleaved,
shuffled timing run (:func:`benchmarks.timing.interleaved_timing`, each call
followed by ``torch.cuda.synchronize()``) holds:

* ``resnet50``: torchvision's ResNet-50 backbone part (stem + 4 stages, as in
  the CPU benchmark), BatchNorm folded;
* ``sar50-dense@r`` / ``sar50-sparse@r``: SAR-ResNet50 G2s2a2b1, deployed
  (``switch_to_deploy()``), random patch masks at exactly the rate ``r``
  (``set_mask_override(r, seed)``); the sparse path runs the Triton kernels
  of :mod:`sar_backbones.inference.triton_refine` (no host sync);
* each of them also replayed from a CUDA graph (``+graph`` rows) where the
  forward can be captured; a capture that fails is reported with its error.

Sparse == dense is checked in fp32 (max relative error). Weights are random.
Needs a CUDA device; on a machine without one the script exits with one line.

Example:
    python benchmarks/gpu_latency.py --sizes 224x224 800x1216 --rates 0 0.5 1.0 \\
        --out benchmarks/results/gpu_latency_h100.json
"""
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.latency import LatencyConfig, _patch_kwargs, fold_batchnorm  # noqa: E402
from benchmarks.timing import (interleaved_timing, max_relative_error,  # noqa: E402
                               save_script_report, script_report_header, summarize)
from sar_backbones.utils.cli import (MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, ArgumentParser,  # noqa: E402
                                     check_report_paths, float_in, non_negative_int, positive_int,
                                     run_tool, size_in)
from tools.analysis.model_builders import build_preset_backbone, torchvision_resnet  # noqa: E402

PRESET = 'sar-resnet50-g2s2a2b1'
DTYPES = OrderedDict([('fp32', None), ('fp16', torch.float16)])


def capture_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """A CUDA graph of ``fn`` (warmed up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _synced(fn: Callable[[], object]) -> Callable[[], None]:
    def call():
        fn()
        torch.cuda.synchronize()
    return call


def run(sizes: Sequence[Tuple[int, int]], rates: Sequence[float], dtypes: Sequence[str],
        reps: int, warmup: int, graphs: bool, seed: int = 0,
        log: Callable[[str], None] = print) -> Tuple[List[dict], List[dict]]:
    """Time every case; returns ``(rows, checks)``."""
    device = torch.device('cuda')
    resnet = fold_batchnorm(torchvision_resnet(50)).to(device).eval()
    rows, checks = [], []
    for size in sizes:
        key = f'{size[0]}x{size[1]}'
        patch = _patch_kwargs(LatencyConfig(), size)
        torch.manual_seed(seed)
        sar = build_preset_backbone(PRESET, **patch).to(device).eval()
        sar.switch_to_deploy()
        x = torch.randn(1, 3, *size, device=device,
                        generator=torch.Generator(device).manual_seed(seed))
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]

            def under(fn, dtype=dtype):
                def call():
                    with torch.inference_mode(), torch.autocast('cuda', dtype=dtype,
                                                                enabled=dtype is not None):
                        return fn()
                return call

            def sar_call(mode: str, rate: float):
                def call():
                    sar.set_inference_mode(mode)
                    sar.set_mask_override(rate, seed=seed)
                    return sar(x)
                return under(call)

            cases: 'OrderedDict[str, Callable[[], object]]' = OrderedDict(
                resnet50=under(lambda: resnet(x)))
            for rate in rates:
                for mode in ('dense', 'sparse'):
                    cases[f'sar50-{mode}@{rate:.2f}'] = sar_call(mode, rate)
            if dtype is None:
                for rate in rates:
                    err = max_relative_error(cases[f'sar50-sparse@{rate:.2f}'](),
                                             cases[f'sar50-dense@{rate:.2f}']())
                    checks.append(dict(size=key, rate=rate, max_rel_error=err))
                    log(f'[check] {key} rate {rate}: sparse vs dense max rel error {err:.2e}')
            graph_errors: Dict[str, str] = {}
            if graphs:
                for name, fn in list(cases.items()):
                    # One graph per case: the mode and rate are fixed inside it.
                    try:
                        cases[f'{name}+graph'] = capture_graph(fn)
                    except RuntimeError as error:
                        graph_errors[f'{name}+graph'] = str(error).splitlines()[0][:160]
                        log(f'[graph] {name}: capture failed: {graph_errors[name + "+graph"]}')
            log(f'[time] {key} {dtype_name}: {len(cases)} cases x {reps} reps')
            samples = interleaved_timing(
                OrderedDict((n, _synced(f)) for n, f in cases.items()), reps, warmup, seed=seed)
            stats = {name: summarize(s) for name, s in samples.items()}
            for name, stat in stats.items():
                reference = 'resnet50+graph' if name.endswith('+graph') and \
                    'resnet50+graph' in stats else 'resnet50'
                row = dict(case=name, size=key, dtype=dtype_name, median_ms=stat['median_ms'],
                           iqr_ms=stat['p75_ms'] - stat['p25_ms'], min_ms=stat['min_ms'],
                           reps=stat['reps'],
                           ratio_vs_resnet=stat['median_ms'] / stats[reference]['median_ms'])
                rows.append(row)
            rows += [dict(case=name, size=key, dtype=dtype_name, error=error)
                     for name, error in graph_errors.items()]
    return rows, checks


def render(report: dict) -> str:
    """Markdown of a report (``meta``, ``rows``)."""
    meta = report['meta']
    lines = script_report_header(meta, 'CUDA latency: SAR-ResNet50 vs ResNet-50 (batch 1)',
                                 f", {meta.get('gpu', 'no GPU')}")
    lines += [f"- {meta['reps']} interleaved rounds after {meta['warmup']} warm-up rounds, "
              'median; `+graph` rows replay a CUDA graph and are compared with the graphed '
              'ResNet-50', '']
    for check in meta.get('checks', []):
        lines.append(f"- check {check['size']} rate {check['rate']}: sparse vs dense max rel "
                     f"error {check['max_rel_error']:.1e}")
    lines += ['', '| size | precision | case | median ms | IQR ms | min ms | / ResNet-50 |',
              '|---|---|---|---|---|---|---|']
    for row in report['rows']:
        if 'error' in row:
            lines.append(f"| {row['size']} | {row['dtype']} | {row['case']} | capture failed: "
                         f"{row['error']} | | | |")
        else:
            lines.append(f"| {row['size']} | {row['dtype']} | {row['case']} | "
                         f"{row['median_ms']:.2f} | {row['iqr_ms']:.2f} | {row['min_ms']:.2f} | "
                         f"{row['ratio_vs_resnet']:.3f} |")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', nargs='+', type=size_in(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE),
                        default=[(224, 224), (800, 1216)], help='HxW or H')
    parser.add_argument('--rates', nargs='+', type=float_in(0.0, 1.0), default=[0.0, 0.5, 1.0])
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument('--reps', type=positive_int, default=50)
    parser.add_argument('--warmup', type=non_negative_int, default=10)
    parser.add_argument('--no-graphs', action='store_true', help='eager calls only')
    parser.add_argument('--out', required=True, help='JSON path; the markdown goes next to it')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing --out JSON and its markdown')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error('no CUDA device: this benchmark times the GPU (the CPU one is '
                     'tools/analysis/benchmark_latency.py)')
    check_report_paths(parser, args.out, args.overwrite)
    rows, checks = run(args.sizes, args.rates, args.dtypes, args.reps, args.warmup,
                       not args.no_graphs)
    return save_script_report('benchmarks/gpu_latency.py', argv, args.out, rows, render,
                              gpu=torch.cuda.get_device_name(), reps=args.reps,
                              warmup=args.warmup, checks=checks)


if __name__ == '__main__':
    run_tool(main)
