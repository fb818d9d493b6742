"""Overlays of the regions SAR-ResNet refines, per stage and group (paper Fig. 6 and 7).

For a classifier, detector or segmenter (config + checkpoint) or a bare
backbone preset (random weights select everything; ``--mask-rate`` draws random
masks instead, or ``--checkpoint`` loads trained weights), every image gets one
PNG per SAR stage and channel group (``<image>_stage<s>_group<g>.png``:
unrefined pixels dimmed, refined ones tinted; with several blocks per stage the
tint is the fraction of blocks refining the pixel), or per block with
``--level block``, and a composite figure ``<image>_masks.png``. ``masks.json``
indexes the files and the per-block activation rates.

Examples:
    python tools/analysis/visualize_masks.py \\
        configs/sar_resnet/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py --checkpoint epoch_110.pth \\
        --images data/demo/imagenet/val --num-images 8 --out-dir vis/cls
    python tools/analysis/visualize_masks.py \\
        configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py \\
        --checkpoint epoch_12.pth --images data/demo/coco/val2017 --out-dir vis/det
    python tools/analysis/visualize_masks.py configs/deeplabv3/... --checkpoint iter_20000.pth \\
        --dataloader --num-images 4 --out-dir vis/seg
    python tools/analysis/visualize_masks.py --preset sar-resnet50-g2s2a2b1 --mask-rate 0.5 \\
        --images some.jpg --out-dir vis/random
"""
import argparse
import json
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.config import DictAction

from sar_backbones.analysis.flops_stats import (dataloader_inputs, image_to_tensor, list_images,
                                                load_image, resize_image)
from sar_backbones.analysis.mask_vis import collect_masks, save_overlays
from sar_backbones.utils.cli import (ArgumentParser, check_inputs_exist, check_output_dir,
                                     count_between, float_in, image_side, non_negative_int,
                                     positive_int, run_tool)

# The tools' shared modules import from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.analysis.model_builders import load_model  # noqa: E402

# Input sizes of the shipped test pipelines: (size, keep_ratio, pad divisor).
TASK_INPUT = {'classifier': ((224, 224), False, 1), 'preset': ((224, 224), False, 1),
              'detector': ((800, 1333), True, 32), 'segmentor': ((512, 512), False, 1),
              'unknown': ((224, 224), False, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; a mistake exits 2 with one line naming the argument."""
    p = ArgumentParser(description=__doc__.split('\n\n')[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', help='config of a classifier, detector or segmenter')
    p.add_argument('--preset', help='bare backbone preset instead, e.g. sar-resnet50-g2s2a2b1')
    p.add_argument('--checkpoint', help='trained weights (whole model or backbone only)')
    p.add_argument('--images', help='image file or folder')
    p.add_argument('--dataloader', action='store_true',
                   help="take the images from the config's test dataloader (its pipeline)")
    p.add_argument('--num-images', type=positive_int, default=4)
    p.add_argument('--shape', type=image_side, nargs='+',
                   action=count_between(1, 2), default=None, metavar='SIDE',
                   help='--images: input H [W] (default by task: 224, 800x1333 keep-ratio, 512)')
    p.add_argument('--keep-ratio', action='store_true', default=None,
                   help='--images: fit inside --shape keeping the aspect ratio (detector default)')
    p.add_argument('--patch-size', type=positive_int, nargs=3, default=None,
                   help='preset only: fixed patch size per SAR stage instead of the 14/7/2 grid')
    p.add_argument('--mask-rate', type=float_in(0.0, 1.0), default=None,
                   help='random masks at this rate in [0, 1] instead of the learned ones')
    p.add_argument('--seed', type=non_negative_int, default=0,
                   help='seed of the random masks of --mask-rate')
    p.add_argument('--level', default='stage', choices=['stage', 'block'])
    p.add_argument('--no-figure', action='store_true', help='skip the composite matplotlib figure')
    p.add_argument('--out-dir', default='work_dirs/mask_vis',
                   help='output folder; must be new or empty unless --overwrite')
    p.add_argument('--overwrite', action='store_true',
                   help='write into a non-empty --out-dir (files of the same names are replaced)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    args = p.parse_args(argv)
    if (args.config is None) == (args.preset is None):
        p.error('give either a config or --preset')
    if args.dataloader == bool(args.images):
        p.error('give either --images or --dataloader')
    if args.dataloader and args.config is None:
        p.error('argument --dataloader: needs a config')
    if args.patch_size and args.config is not None:
        p.error('argument --patch-size: only for --preset (a config sets its own patches)')
    if args.cfg_options and args.config is None:
        p.error('argument --cfg-options: only for a config, not --preset')
    if args.dataloader and (args.shape or args.keep_ratio is not None):
        p.error('argument --shape/--keep-ratio: only for --images (the dataloader has its '
                'own pipeline)')
    check_inputs_exist(p, [('config', args.config), ('--checkpoint', args.checkpoint),
                           ('--images', args.images)])
    if args.images and osp.isdir(args.images) and osp.isdir(args.out_dir) and \
            osp.samefile(args.images, args.out_dir):
        p.error(f'argument --out-dir: {args.out_dir} is also the input folder of --images')
    check_output_dir(p, '--out-dir', args.out_dir, args.overwrite)
    return args


def _normalisation(model) -> Tuple[Tuple[float, ...], Tuple[float, ...], bool]:
    """Mean, std (RGB order) and whether the network input is RGB, from the data preprocessor."""
    dp = getattr(model, 'data_preprocessor', None)
    mean = getattr(dp, 'mean', None)
    std = getattr(dp, 'std', None)
    rgb = bool(getattr(dp, '_channel_conversion', getattr(dp, 'to_rgb', True)))
    if mean is None or std is None or mean.numel() != 3:
        return (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), True
    return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()), rgb


def _to_picture(x: torch.Tensor, mean, std, rgb: bool) -> np.ndarray:
    """Invert the normalisation of a (1, 3, H, W) input to an RGB uint8 picture."""
    img = x[0].detach().cpu().float() * torch.tensor(std).view(3, 1, 1) + \
        torch.tensor(mean).view(3, 1, 1)
    img = img.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    return img if rgb else img[..., ::-1].copy()


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    cfg, task, model, backbone = load_model(args.config, args.preset, args.checkpoint,
                                            args.patch_size, args.cfg_options)
    name = osp.splitext(osp.basename(args.config))[0] if args.config else args.preset
    mean, std, rgb = _normalisation(model)

    # (stem, network input, picture, picture size inside the input)
    items: List[Tuple[str, torch.Tensor, np.ndarray, Optional[Tuple[int, int]]]] = []
    if args.images:
        size, keep_ratio, pad = TASK_INPUT.get(task, TASK_INPUT['unknown'])
        if args.shape:
            size = tuple(args.shape) if len(args.shape) == 2 else (args.shape[0], args.shape[0])
        if args.keep_ratio is not None:
            keep_ratio = args.keep_ratio
        for path in list_images(args.images, args.num_images):
            picture = resize_image(load_image(path), size, keep_ratio=keep_ratio)
            padded = resize_image(picture, picture.shape[:2], pad_divisor=pad)
            x = image_to_tensor(padded if rgb else padded[..., ::-1], mean, std)
            items.append((osp.splitext(osp.basename(path))[0], x, picture, picture.shape[:2]))
    else:
        for index, (path, x) in enumerate(dataloader_inputs(model, cfg, args.num_images)):
            stem = osp.splitext(osp.basename(str(path)))[0] or str(index)
            items.append((f'{index:04d}_{stem}', x[:1], _to_picture(x[:1], mean, std, rgb), None))

    os.makedirs(args.out_dir, exist_ok=True)
    index: Dict[str, object] = {'model': args.config or args.preset, 'task': task,
                                'checkpoint': args.checkpoint, 'mask_rate': args.mask_rate,
                                'level': args.level, 'images': {}}
    for stem, x, picture, picture_size in items:
        collected = collect_masks(model, x, image_size=picture_size, rate=args.mask_rate,
                                  seed=args.seed)
        masks_kind = f'random masks at {args.mask_rate}' if args.mask_rate is not None \
            else 'learned masks'
        title = f'{name} ({masks_kind}): {stem}, rate {np.mean(collected["rates"]):.2f}'
        entry = save_overlays(picture, collected, args.out_dir, stem, level=args.level,
                              figure=not args.no_figure, title=title)
        entry['input_shape'] = list(x.shape[1:])
        block_stages = collected['stage_of_block']
        entry['stage_rates'] = [
            float(np.mean([r for r, s in zip(collected['rates'], block_stages) if s == stage]))
            for stage in sorted(set(block_stages))]
        index['images'][stem] = entry
        # Learned masks are the deterministic eval-mode ones, as at inference.
        kind = 'inference (deterministic)' if args.mask_rate is None else 'random-mask'
        print(f"{stem}: rate {entry['activation_rate']:.3f}; per-stage {kind} rates: "
              + ' / '.join(f'{r:.3f}' for r in entry['stage_rates'])
              + f"; {len(entry['overlays'])} overlays")
    with open(osp.join(args.out_dir, 'masks.json'), 'w') as f:
        json.dump(index, f, indent=1)
    print(f"wrote {len(items)} image(s) to {args.out_dir}")
    return index


if __name__ == '__main__':
    run_tool(main)
