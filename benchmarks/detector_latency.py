"""End-to-end inference latency of mmdet's Faster R-CNN FPN: SAR-R50 vs ResNet-50 (issue 18).

Times mmdet's own ``test_step`` (data preprocessor, backbone, FPN neck, RPN
head with its NMS, RoI head with its NMS: the whole detector) at batch 1,
eager (no ``torch.compile``), in one process and in interleaved, shuffled
rounds on the same image (:func:`benchmarks.timing.interleaved_timing`):

* ``resnet50``: mmdet's ``faster-rcnn_r50_fpn_1x_coco.py``, BatchNorm folded
  into the convolutions (mmcv's ``fuse_conv_bn``);
* ``sar_r50``: the shipped ``configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py``
  (same neck and heads), its backbone deployed (``switch_to_deploy()``:
  BatchNorm folded, refine weights prepacked; sparse inference) with random
  patch masks at exactly the activation rate ``t`` (``--rate``, default 0.5:
  ``set_mask_override(rate, seed=0)``), so that the rate does not depend on
  the random weights.

Weights are random (no checkpoint is needed to time a forward); both models
see the same image, a random uint8 image of ``--size`` (default 800x1216).
``--quick`` runs a tiny image (a test of the script, not a measurement).
The report (JSON and markdown) names the machine, the command and the commit.

Example (on a quiet machine):
    python benchmarks/detector_latency.py --threads 1 --reps 10 \\
        --out benchmarks/results/detector_latency_amd-epyc-2cpu_1thread.json
"""
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from mmcv.cnn import fuse_conv_bn

REPO = Path(__file__).resolve().parents[1]
# The benchmark helpers are the repository's `benchmarks` package (run from anywhere).
sys.path.insert(0, str(REPO))
from benchmarks.timing import (interleaved_timing, save_script_report,  # noqa: E402
                               script_report_header, set_threads, summarize)
from benchmarks.train_step import TASKS, build_model  # noqa: E402
from sar_backbones.inference import native  # noqa: E402
from sar_backbones.utils.cli import (MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, ArgumentParser,  # noqa: E402
                                     check_report_paths, float_in, int_in, non_negative_int,
                                     positive_int, size_in)

FULL_SIZE = (800, 1216)
QUICK_SIZE = (128, 160)
MODELS = ('resnet50', 'sar_r50')


def _config_name(path: str) -> str:
    """A config path relative to the repository, or the file name of an mmdet config."""
    return str(Path(path).relative_to(REPO)) if path.startswith(str(REPO)) else Path(path).name


def build_detector(name: str, rate: float) -> Tuple[torch.nn.Module, str]:
    """The eval detector ``name`` of :data:`MODELS` with BN folded, and its config path.

    Args:
        name (str): ``'resnet50'`` or ``'sar_r50'``.
        rate (float): The SAR model's activation rate ``t`` (random patch masks).

    Returns:
        tuple: The model (eval, BN folded; SAR deployed and sparse) and its config.
    """
    config = TASKS['detection'][3][name]()
    model = build_model(config, 'mmdet').eval()
    if name == 'sar_r50':
        backbone = model.backbone
        backbone.set_mask_override(rate, seed=0)
        backbone.set_inference_mode('sparse')
        backbone.switch_to_deploy()  # BN folded, selectors stacked, refine weights prepacked
    else:
        model = fuse_conv_bn(model)
    return model, config


def detection_input(size: Tuple[int, int], seed: int = 0) -> dict:
    """One random uint8 image and its metadata, as mmdet's ``test_step`` takes them."""
    from mmdet.structures import DetDataSample
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size,
                                         scale_factor=(1.0, 1.0)))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return dict(inputs=[image], data_samples=[sample])


def make_call(model: torch.nn.Module, data: dict) -> Callable[[], list]:
    """One ``test_step`` (preprocessing, backbone, neck, heads, NMS) under inference mode."""

    def call() -> list:
        with torch.inference_mode():
            return model.test_step(data)

    return call


def run(size: Tuple[int, int], rate: float, reps: int, warmup: int, seed: int = 0) -> List[dict]:
    """Time the detectors of :data:`MODELS` in interleaved rounds; one row per model."""
    data = detection_input(size, seed)
    calls: 'OrderedDict[str, Callable[[], list]]' = OrderedDict()
    configs, detections = {}, {}
    for name in MODELS:
        torch.manual_seed(seed)
        model, configs[name] = build_detector(name, rate)
        calls[name] = make_call(model, data)
        result = calls[name]()[0].pred_instances  # also builds lazy state
        if not bool(torch.isfinite(result.bboxes).all() and torch.isfinite(result.scores).all()):
            raise RuntimeError(f'{name}: the detector predicted non-finite boxes or scores')
        detections[name] = len(result.bboxes)
        if name == 'sar_r50':
            rates = model.backbone.get_activation_rates()
            measured_rate = float(rates.mean())
    samples = interleaved_timing(calls, reps, warmup, seed=seed)
    stats: Dict[str, Dict[str, float]] = {name: summarize(samples[name]) for name in calls}
    reference = stats['resnet50']['median_ms']
    return [{
        'model': name, 'config': _config_name(configs[name]), 'size': list(size), 'batch': 1,
        'activation_rate': measured_rate if name == 'sar_r50' else None,
        'detections': detections[name],
        'median_ms': stats[name]['median_ms'],
        'iqr_ms': stats[name]['p75_ms'] - stats[name]['p25_ms'],
        'min_ms': stats[name]['min_ms'], 'samples_ms': [s * 1e3 for s in samples[name]],
        'ratio_to_resnet50': stats[name]['median_ms'] / reference,
    } for name in calls]


def render(report: dict) -> str:
    meta = report['meta']
    size = 'x'.join(map(str, report['rows'][0]['size']))
    lines = script_report_header(
        meta, 'Faster R-CNN FPN end to end: SAR-R50 vs ResNet-50 (batch 1, eager)',
        f", {meta['threads']} threads; refine kernel {meta['refine_kernel']}") + [
        f"- mmdet `test_step` (preprocessing, backbone, FPN, RPN, RoI head, NMS) at {size}, "
        f"random weights, BN folded on both sides, SAR backbone deployed + sparse with random "
        f"masks at rate {meta['rate']} (`set_mask_override({meta['rate']}, seed=0)`); "
        f"{meta['reps']} interleaved rounds after {meta['warmup']} warm-up rounds, median"
        + (' (--quick: tiny image, not a measurement)' if meta['quick'] else ''),
        '',
        '| model | config | rate | median ms | IQR ms | min ms | / ResNet-50 |',
        '|---|---|---|---|---|---|---|',
    ]
    for row in report['rows']:
        rate = '-' if row['activation_rate'] is None else f"{row['activation_rate']:.3f}"
        lines.append(f"| {row['model']} | {row['config']} | {rate} | {row['median_ms']:.1f} | "
                     f"{row['iqr_ms']:.1f} | {row['min_ms']:.1f} | "
                     f"{row['ratio_to_resnet50']:.2f}x |")
    return '\n'.join(lines + [''])


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=size_in(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE), default=None,
                        help='HxW of the image (default 800x1216; --quick: 128x160)')
    parser.add_argument('--rate', type=float_in(0.0, 1.0), default=0.5,
                        help='activation rate t of the SAR backbone (random patch masks)')
    parser.add_argument('--threads', type=int_in(0, 4096), default=1,
                        help='intra-op threads; 0 = all logical CPUs')
    parser.add_argument('--reps', type=positive_int, default=10)
    parser.add_argument('--warmup', type=non_negative_int, default=2)
    parser.add_argument('--quick', action='store_true',
                        help='a tiny image (a test of the script, not a measurement)')
    parser.add_argument('--out', required=True, help='JSON path; the markdown goes next to it')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing --out JSON and its markdown')
    args = parser.parse_args(argv)
    check_report_paths(parser, args.out, args.overwrite)
    size = args.size or (QUICK_SIZE if args.quick else FULL_SIZE)
    threads = set_threads(args.threads)
    rows = run(size, args.rate, args.reps, args.warmup)
    kernel = native.refine_kernel()
    if kernel == 'auto':
        kernel = 'auto (native)' if native.use_native(torch.zeros(1)) else \
            f'auto (PyTorch: {"native not built" if not native.load() else "threads > 1"})'
    return save_script_report('benchmarks/detector_latency.py', argv, args.out, rows, render,
                              threads=threads, reps=args.reps, warmup=args.warmup,
                              quick=args.quick, rate=args.rate, refine_kernel=kernel)


if __name__ == '__main__':
    main()
