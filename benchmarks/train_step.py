"""Time one training step (forward + backward + SGD) of SAR-R50 task models vs ResNet-50 ones.

Users finetune detectors and segmentors with the dense masked path of SAR
(straight-through Gumbel masks, every refine block at full size), so a
training step costs more than the backbone's inference FLOPs suggest. This
script times mmdet's / mmseg's own ``train_step`` of, in one process and in
interleaved, shuffled rounds (:func:`interleaved_timing`):

* Faster R-CNN FPN at 800x1216: the shipped
  ``configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py``
  against mmdet's ``faster-rcnn_r50_fpn_1x_coco.py``;
* DeepLab-v3 OS8 at 512x512: the shipped
  ``configs/deeplabv3/deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py``
  against mmseg's ``deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py``.

Batch 2, random images and annotations, the same SGD optimizer for every
model, backbone weights random (no ImageNet checkpoint is needed to time a
step), SyncBN replaced by BN. ``--quick`` runs tiny images once (a test of
the script, not a measurement).

Example:
    python benchmarks/train_step.py --threads 0 \\
        --out benchmarks/results/train_step_amd-epyc-2cpu.json
"""
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import init_default_scope

REPO = Path(__file__).resolve().parents[1]
# The benchmark helpers are the repository's `benchmarks` package (run from anywhere).
sys.path.insert(0, str(REPO))
from benchmarks.timing import (interleaved_timing, save_script_report,  # noqa: E402
                               script_report_header, set_threads, summarize)
from sar_backbones.utils.cli import (ArgumentParser, check_report_paths, int_in,  # noqa: E402
                                     non_negative_int, positive_int)

BATCH = 2


def _package_config(package: str, name: str) -> str:
    """A config shipped with an installed OpenMMLab package (its ``.mim/configs``)."""
    module = __import__(package)
    return str(Path(module.__file__).parent / '.mim' / 'configs' / name)


# task -> (scope, full size, quick size, {model name: config path})
TASKS = OrderedDict(
    detection=('mmdet', (800, 1216), (128, 160), OrderedDict(
        resnet50=lambda: _package_config('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'),
        sar_r50=lambda: str(REPO / 'configs' / 'faster_rcnn' /
                            'faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'))),
    segmentation=('mmseg', (512, 512), (64, 64), OrderedDict(
        resnet50=lambda: _package_config(
            'mmseg', 'deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py'),
        sar_r50=lambda: str(REPO / 'configs' / 'deeplabv3' /
                            'deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py'))),
)


def build_model(config: str, scope: str, quick_size: Tuple[int, int] = None) -> torch.nn.Module:
    """The config's model in training mode, without pretrained weights, SyncBN -> BN.

    With ``quick_size`` the segmentor pads to that size instead of its crop
    size and the detector samples fewer proposals and RoIs (a fast test).
    """
    from sar_backbones.engine import swap_sync_bn
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    cfg.model.pop('pretrained', None)
    swap_sync_bn(cfg)
    if quick_size is not None:
        if cfg.model.data_preprocessor.get('size') is not None:
            cfg.model.data_preprocessor.size = quick_size
        if 'rcnn' in cfg.model.get('train_cfg', {}):
            cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
            cfg.model.train_cfg.rcnn.sampler.num = 32
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    model.init_weights()
    return model.train()


def detection_batch(size: Tuple[int, int], generator: torch.Generator) -> dict:
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    height, width = size
    samples = []
    for _ in range(BATCH):
        sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size,
                                             scale_factor=(1.0, 1.0)))
        corner = torch.rand(4, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        extent = (torch.rand(4, 2, generator=generator) * 0.4 + 0.1) * torch.tensor([width, height])
        sample.gt_instances = InstanceData(bboxes=torch.cat([corner, corner + extent], dim=1),
                                           labels=torch.randint(0, 80, (4, ), generator=generator))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                      generator=generator) for _ in range(BATCH)],
                data_samples=samples)


def segmentation_batch(size: Tuple[int, int], generator: torch.Generator) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(BATCH):
        sample = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 21, (1, *size), dtype=torch.long, generator=generator))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, *size), dtype=torch.uint8,
                                      generator=generator) for _ in range(BATCH)],
                data_samples=samples)


def make_step(model: torch.nn.Module, data: dict) -> Callable[[], Dict[str, torch.Tensor]]:
    """One ``train_step`` (data preprocessor, losses, backward, SGD update) on fixed data."""
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9,
                                         weight_decay=1e-4))

    def step() -> Dict[str, torch.Tensor]:
        return model.train_step(data, optim)

    return step


def run(tasks: List[str], quick: bool, reps: int, warmup: int, seed: int = 0) -> List[dict]:
    rows = []
    for task in tasks:
        scope, full_size, quick_size, configs = TASKS[task]
        size = quick_size if quick else full_size
        generator = torch.Generator().manual_seed(seed)
        batch = (detection_batch if task == 'detection' else segmentation_batch)(size, generator)
        steps = OrderedDict()
        losses = {}
        for name, config in configs.items():
            torch.manual_seed(seed)
            steps[name] = make_step(build_model(config(), scope, size if quick else None),
                                    batch)
            losses[name] = float(steps[name]()['loss'])  # also builds lazy state
        samples = interleaved_timing(steps, reps, warmup, seed=seed)
        stats = {name: summarize(samples[name]) for name in steps}
        rows.append({
            'task': task, 'size': list(size), 'batch': BATCH,
            'configs': {name: str(Path(config()).relative_to(REPO))
                        if str(config()).startswith(str(REPO)) else Path(config()).name
                        for name, config in configs.items()},
            'first_loss': losses,
            'models': {name: {'median_s': s['median_ms'] / 1e3, 'min_s': s['min_ms'] / 1e3,
                              'samples_s': list(samples[name])} for name, s in stats.items()},
            'ratio': stats['sar_r50']['median_ms'] / stats['resnet50']['median_ms'],
        })
    return rows


def render(report: dict) -> str:
    meta = report['meta']
    lines = script_report_header(meta, 'One training step: SAR-R50 vs ResNet-50 task models',
                                 f", {meta['threads']} threads") + [
        f"- batch {BATCH}, forward + backward + SGD step (mmengine `train_step`), random data; "
        f"{meta['reps']} interleaved rounds after {meta['warmup']} warm-up rounds, median"
        + (' (--quick: tiny images, not a measurement)' if meta['quick'] else ''),
        '',
        '| task | size | ResNet-50 s | SAR-R50 s | SAR / ResNet |',
        '|---|---|---|---|---|',
    ]
    for row in report['rows']:
        models = row['models']
        lines.append(f"| {row['task']} | {row['size'][0]}x{row['size'][1]} | "
                     f"{models['resnet50']['median_s']:.3f} | "
                     f"{models['sar_r50']['median_s']:.3f} | {row['ratio']:.2f}x |")
    lines += ['', 'Configs: ' + '; '.join(
        f"{row['task']}: {row['configs']['sar_r50']} vs {row['configs']['resnet50']}"
        for row in report['rows']), '']
    return '\n'.join(lines)


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS), default=list(TASKS))
    parser.add_argument('--threads', type=int_in(0, 4096), default=0,
                        help='intra-op threads; 0 = all logical CPUs')
    parser.add_argument('--reps', type=positive_int, default=5)
    parser.add_argument('--warmup', type=non_negative_int, default=1)
    parser.add_argument('--quick', action='store_true',
                        help='tiny images (a test of the script, not a measurement)')
    parser.add_argument('--out', required=True, help='JSON path; the markdown goes next to it')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing --out JSON and its markdown')
    args = parser.parse_args(argv)
    check_report_paths(parser, args.out, args.overwrite)
    threads = set_threads(args.threads)
    rows = run(args.tasks, args.quick, args.reps, args.warmup)
    return save_script_report('benchmarks/train_step.py', argv, args.out, rows, render,
                              threads=threads, reps=args.reps, warmup=args.warmup,
                              quick=args.quick)


if __name__ == '__main__':
    main()
