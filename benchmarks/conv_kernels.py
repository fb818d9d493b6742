"""Throughput of the CPU kernels behind the convolutions of ResNet-50 and the sparse refine branch.

``BENCHMARKS.md`` explains latency by kernel efficiency; this script measures
it. Each shape is one convolution of SAR-ResNet50 G2s2a2b1 or ResNet-50 at
224x224 (batch 1, channels-last inputs as in the sparse path; a sparse 1x1
product is a ``(1, C, rows, 1)`` map of gathered pixels, a 3x3 conv runs on
the gathered windows), timed through each kernel PyTorch offers:

* ``default``: ``F.conv2d``, i.e. PyTorch's own choice (THNN's gemm for a
  batch-1 stride-1 1x1 conv on one thread, oneDNN otherwise);
* ``addmm``: ``torch.addmm`` on the pixel rows (the BLAS gemm, 1x1 only);
* ``onednn``: ``aten::mkldnn_convolution`` (weights reordered on every call);
* ``onednn-prepacked``: ``mkldnn._convolution_pointwise`` with the weights
  reordered once and the ReLU fused, as a fused native kernel would run.

Example:
    python benchmarks/conv_kernels.py --threads 1 \\
        --out benchmarks/results/conv_kernels_amd-epyc-2cpu.json
"""
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

# The benchmark helpers are the repository's `benchmarks` package (run from anywhere).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.timing import (interleaved_timing, save_script_report,  # noqa: E402
                               script_report_header, set_threads, summarize)
from sar_backbones.utils.cli import (ArgumentParser, check_report_paths, int_in,  # noqa: E402
                                     non_negative_int, positive_int)

# (label, input shape (N, C, H, W), output channels, kernel size, padding)
SHAPES = [
    ('refine s1 conv1 rows (G=2)', (1, 128, 1568, 1), 32, 1, 0),
    ('refine s1 conv3 rows (G=2)', (1, 32, 1568, 1), 128, 1, 0),
    ('refine s2 conv1 rows (G=2)', (1, 256, 392, 1), 64, 1, 0),
    ('refine s3 conv3 rows (G=2)', (1, 128, 98, 1), 512, 1, 0),
    ('refine s2 shortcut rows', (1, 256, 786, 1), 512, 1, 0),
    ('ResNet layer1 conv3', (1, 64, 56, 56), 256, 1, 0),
    ('ResNet layer3 conv1', (1, 1024, 14, 14), 256, 1, 0),
    ('ResNet layer4 conv3', (1, 512, 7, 7), 2048, 1, 0),
    ('refine s1 conv2 windows (G=2)', (98, 32, 6, 6), 32, 3, 0),
    ('refine s3 conv2 windows (G=2)', (2, 128, 9, 9), 128, 3, 0),
    ('ResNet layer1 conv2', (1, 64, 56, 56), 64, 3, 1),
    ('ResNet layer3 conv2', (1, 256, 14, 14), 256, 3, 1),
]
KERNELS = ('default', 'addmm', 'onednn', 'onednn-prepacked')


def _kernel_fns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                padding: int) -> Dict[str, Optional[Callable[[], torch.Tensor]]]:
    pad = [padding, padding]
    one = [1, 1]
    fns: Dict[str, Optional[Callable[[], torch.Tensor]]] = {
        'default': lambda: F.conv2d(x, weight, bias, padding=padding).relu_(),
        'addmm': None,
        'onednn': lambda: torch.ops.aten.mkldnn_convolution(x, weight, bias, pad, one, one,
                                                            1).relu_(),
        'onednn-prepacked': None,
    }
    if weight.shape[-1] == 1:
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: x is channels-last
        matrix = weight.flatten(1).t()
        fns['addmm'] = lambda: torch.addmm(bias, rows, matrix).relu_()
    if hasattr(torch.ops.mkldnn, '_convolution_pointwise'):
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), pad, one, one, 1,
                                                           list(x.shape))
        fns['onednn-prepacked'] = lambda: torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, pad, one, one, 1, 'relu', [], '')
    return fns


def _as_rows(out: torch.Tensor) -> torch.Tensor:
    """Pixel-major ``(pixels, C)`` view of a conv output (``addmm`` already gives rows)."""
    return out if out.dim() == 2 else out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


def run(threads: int, reps: int, warmup: int, seed: int = 0) -> List[dict]:
    """One row per shape: median ms and GMAC/s of every kernel, and their agreement."""
    set_threads(threads)
    torch.manual_seed(seed)
    rows = []
    with torch.inference_mode():
        for label, shape, out_channels, kernel, padding in SHAPES:
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(out_channels, shape[1], kernel, kernel).contiguous(
                memory_format=torch.channels_last) / (shape[1] * kernel * kernel)**0.5
            bias = torch.randn(out_channels)
            out_height, out_width = (side + 2 * padding - kernel + 1 for side in shape[2:])
            out_pixels = out_height * out_width
            macs = shape[0] * out_pixels * out_channels * shape[1] * kernel * kernel
            available = _kernel_fns(x, weight, bias, padding).items()
            fns = OrderedDict((name, fn) for name, fn in available if fn is not None)
            reference = _as_rows(fns['default']())
            errors = {name: float((_as_rows(fn()) - reference).abs().max())
                      for name, fn in fns.items()}
            # The kernels of a shape in interleaved shuffled rounds, as benchmark_latency does.
            samples = interleaved_timing(fns, reps, warmup, seed=seed)
            row = {'shape': label, 'input': list(shape), 'out_channels': out_channels,
                   'kernel': kernel, 'mmacs': macs / 1e6, 'kernels': {}}
            for name in fns:
                ms = summarize(samples[name])['median_ms']
                row['kernels'][name] = {'ms': ms, 'gmacs_per_s': macs / ms / 1e6,
                                        'max_abs_diff_vs_default': errors[name]}
            rows.append(row)
    return rows


def render(report: dict) -> str:
    meta = report['meta']
    lines = script_report_header(meta, 'Convolution kernels: throughput per shape',
                                 f"; threads: {meta['threads']}") + [
        '- batch 1, float32, channels-last inputs, bias + ReLU; the kernels of a shape in '
        f"{meta['reps']} interleaved shuffled rounds after {meta['warmup']} warm-up rounds; "
        'median per kernel; GMAC/s = MACs / median',
        '',
        '| shape | input | out | k | MMACs | ' + ' | '.join(f'{k} ms (GMAC/s)' for k in KERNELS)
        + ' |',
        '|---|---|---|---|---|' + '---|' * len(KERNELS),
    ]
    for row in report['rows']:
        cells = []
        for name in KERNELS:
            result = row['kernels'].get(name)
            cells.append('-' if result is None else
                         f"{result['ms']:.3f} ({result['gmacs_per_s']:.0f})")
        lines.append(f"| {row['shape']} | {'x'.join(map(str, row['input']))} | "
                     f"{row['out_channels']} | {row['kernel']} | {row['mmacs']:.1f} | "
                     + ' | '.join(cells) + ' |')
    worst = max(result['max_abs_diff_vs_default'] for row in report['rows']
                for result in row['kernels'].values())
    lines += ['', f'All kernels agree with `default` to {worst:.1e} (max abs difference).', '']
    return '\n'.join(lines)


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int_in(0, 4096), default=1,
                        help='intra-op threads; 0 = all logical CPUs')
    parser.add_argument('--reps', type=positive_int, default=200)
    parser.add_argument('--warmup', type=non_negative_int, default=20)
    parser.add_argument('--out', required=True, help='JSON path; the markdown goes next to it')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing --out JSON and its markdown')
    args = parser.parse_args(argv)
    check_report_paths(parser, args.out, args.overwrite)
    rows = run(args.threads, args.reps, args.warmup)
    return save_script_report('benchmarks/conv_kernels.py', argv, args.out, rows, render,
                              threads=args.threads, reps=args.reps, warmup=args.warmup)


if __name__ == '__main__':
    main()
