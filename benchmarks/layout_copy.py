"""NCHW <-> NHWC copies of the sparse path: PyTorch's blocked 2-D transpose vs its strided copy.

The sparse refine path works on channels-last pixel rows, so an NCHW backbone
copies each SAR stage's input into rows and the refine output back to NCHW
(``sar_backbones/inference/memory_format.py``). PyTorch has two kernels
for such a copy:

* ``blocked``: image by image as a 2-D transpose ``(C, H*W)`` <-> ``(H*W, C)``,
  which takes ATen's cache-blocked transpose, a serial loop;
* ``strided``: the 4-D permutation as one ``copy_``, ATen's generic strided
  copy, parallel over the intra-op threads.

The project copies into rows with the strided copy and back to NCHW with the
blocked transpose up to ``BLOCKED_TO_NCHW_MAX_THREADS`` threads, strided above
(``memory_format.blocked_nchw_copy``).

Each is timed into a fresh output, as in the model (page faults included),
on the maps of SAR-ResNet50 G2s2a2b1 at 800x1216 and 224x224, at every
thread count given; the report marks the kernel ``memory_format`` picks.

Example:
    python benchmarks/layout_copy.py --threads 1 2 \\
        --out benchmarks/results/layout_copy_amd-epyc-2cpu.json
"""
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, List

import torch

# The benchmark helpers are the repository's `benchmarks` package (run from anywhere).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.timing import (interleaved_timing, save_script_report,  # noqa: E402
                               script_report_header, set_threads, summarize)
from sar_backbones.inference import memory_format  # noqa: E402
from sar_backbones.utils.cli import (ArgumentParser, check_report_paths, int_in,  # noqa: E402
                                     non_negative_int, positive_int)

# (direction, (C, H, W)): refine outputs back to NCHW, stage inputs into rows.
SHAPES = [('to NCHW', shape) for shape in ((256, 200, 304), (512, 100, 152), (1024, 50, 76),
                                           (256, 56, 56), (512, 28, 28), (1024, 14, 14))] + \
         [('to rows', shape) for shape in ((64, 200, 304), (256, 100, 152), (512, 50, 76),
                                           (64, 56, 56), (256, 28, 28), (512, 14, 14))]
KERNELS = ('blocked', 'strided')


def _copies(direction: str, shape) -> 'OrderedDict[str, Callable[[], torch.Tensor]]':
    channels, height, width = shape
    pixels = height * width
    if direction == 'to NCHW':
        x = torch.randn(1, *shape).contiguous(memory_format=torch.channels_last)
        return OrderedDict(blocked=lambda: memory_format.nchw_copy_blocked(x),
                           strided=lambda: x.contiguous())
    x = torch.randn(1, *shape)
    return OrderedDict(
        blocked=lambda: torch.empty(pixels, channels).copy_(x[0].view(channels, pixels).t()),
        strided=lambda: memory_format.copy_to_rows_(torch.empty(pixels, channels), x))


def _picked(direction: str) -> str:
    """The kernel sar_backbones uses for the copy at the current thread count."""
    if direction == 'to NCHW' and memory_format.blocked_nchw_copy(torch.device('cpu')):
        return 'blocked'
    return 'strided'


def run(threads: List[int], reps: int, warmup: int) -> List[dict]:
    rows = []
    with torch.inference_mode():
        for requested in threads:
            count = set_threads(requested)
            for direction, shape in SHAPES:
                copies = _copies(direction, shape)
                results = [fn() for fn in copies.values()]
                agree = all(torch.equal(r.flatten(), results[0].flatten()) for r in results)
                samples = interleaved_timing(copies, reps, warmup)
                moved = 2 * 4 * shape[0] * shape[1] * shape[2]  # bytes read + written
                row = {'threads': count, 'direction': direction, 'shape': list(shape),
                       'mib': moved / 2 / 2**20, 'agree': agree,
                       'picked': _picked(direction), 'kernels': {}}
                for name in copies:
                    ms = summarize(samples[name])['median_ms']
                    row['kernels'][name] = {'ms': ms, 'gb_per_s': moved / ms / 1e6}
                rows.append(row)
    return rows


def render(report: dict) -> str:
    meta = report['meta']
    title = 'NCHW <-> NHWC copies: blocked 2-D transpose vs strided copy'
    lines = script_report_header(meta, title) + [
        f"- float32, batch 1, fresh output per call; {meta['reps']} interleaved rounds after "
        f"{meta['warmup']} warm-up rounds, median; GB/s counts bytes read + written; "
        "'picked': the kernel sar_backbones uses at that thread count",
        '',
        '| threads | copy | C x H x W | MiB | blocked ms (GB/s) | strided ms (GB/s) | faster | '
        'picked |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for row in report['rows']:
        kernels = row['kernels']
        faster = min(KERNELS, key=lambda name: kernels[name]['ms'])
        cells = [f"{kernels[name]['ms']:.2f} ({kernels[name]['gb_per_s']:.1f})" for name in KERNELS]
        lines.append(f"| {row['threads']} | {row['direction']} | {'x'.join(map(str, row['shape']))}"
                     f" | {row['mib']:.1f} | {' | '.join(cells)} | {faster} | {row['picked']} |")
    agree = all(row['agree'] for row in report['rows'])
    lines += ['', f"Both kernels give identical copies: {'yes' if agree else 'NO'}.", '']
    return '\n'.join(lines)


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int_in(0, 4096), nargs='+', default=[1],
                        help='intra-op thread counts; 0 = all logical CPUs')
    parser.add_argument('--reps', type=positive_int, default=15)
    parser.add_argument('--warmup', type=non_negative_int, default=2)
    parser.add_argument('--out', required=True, help='JSON path; the markdown goes next to it')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing --out JSON and its markdown')
    args = parser.parse_args(argv)
    check_report_paths(parser, args.out, args.overwrite)
    rows = run(args.threads, args.reps, args.warmup)
    return save_script_report('benchmarks/layout_copy.py', argv, args.out, rows, render,
                              reps=args.reps, warmup=args.warmup)


if __name__ == '__main__':
    main()
