"""Parameters, dense FLOPs and effective FLOPs of a SAR backbone (the paper's convention).

FLOPs are multiply-accumulates counted as the paper counts them (see
``sar_backbones/analysis/complexity.py``): refine convolutions cost
``rate x`` their dense cost, everything else runs densely. The model is a
shipped config (built through its task registry; FLOPs are those of
``model.backbone``, plus the classifier head for classifiers) or a bare
backbone preset. Give an assumed activation rate (``--rate``), or measure the
rates the model picks on images (``--images`` folder or ``--dataloader``: the
config's test dataloader); a measurement reports mean/std/per-stage rates and
FLOPs and saves the per-image histograms of the paper's Fig. 5 as a PNG.
Each SAR backbone is compared with the plain network it replaces, of the same
widths, strides and dilations (:func:`reference_model`): SAR-ResNet with
ResNet, SAR-ResNeXt with ResNeXt, SAR-MobileNetV2 with MobileNetV2.

Examples:
    python tools/analysis/get_flops.py --preset sar-resnet50-g2s2a2b1 --rate 0.5 \\
        --num-classes 1000
    python tools/analysis/get_flops.py \\
        configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py \\
        --shape 800 1216 --rate 0.3 0.5 1.0
    python tools/analysis/get_flops.py \\
        configs/sar_mobilenet_v2/sar-mobilenet-v2-g2s2a2b1-t0.5_8xb32_in1k.py --rate 0.5
    python tools/analysis/get_flops.py \\
        configs/sar_resnet/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py \\
        --checkpoint epoch_110.pth --dataloader --num-images 1000 --out work_dirs/flops.json
    python tools/analysis/get_flops.py --preset sar-resnet50-g2s2a2b1 --checkpoint backbone.pth \\
        --images data/demo/imagenet/val --num-images 200 --hist work_dirs/fig5.png
"""
import argparse
import json
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.config import DictAction

from sar_backbones.analysis import count_macs
from sar_backbones.analysis.flops_stats import (assumed_rate_complexity, dataloader_inputs,
                                                folder_inputs, measure_rates,
                                                plot_rate_flops_histogram, rate_statistics)
from sar_backbones.engine.hooks import get_sar_backbone
from sar_backbones.models import SARMobileNetV2, SARResNeXt
from sar_backbones.utils.cli import (ArgumentParser, check_inputs_exist, check_no_overlap,
                                     check_output_file, count_between, float_in, image_side, int_in,
                                     positive_int, run_tool)

# The tools' shared modules import from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.analysis.model_builders import load_model, reference_resnet  # noqa: E402

DEFAULT_SHAPES = {'classifier': (224, 224), 'preset': (224, 224), 'detector': (800, 1333),
                  'segmentor': (512, 512), 'unknown': (224, 224)}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; a mistake exits 2 with one line naming the argument."""
    p = ArgumentParser(description=__doc__.split('\n\n')[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', help='config file (or use --preset)')
    p.add_argument('--preset', help='backbone preset, e.g. sar-resnet50-g2s2a2b1[-t0.5]')
    p.add_argument('--checkpoint', help='trained weights (whole model or backbone only)')
    p.add_argument('--shape', type=image_side, nargs='+',
                   action=count_between(1, 2), default=None, metavar='SIDE',
                   help='input H [W]; default 224 (classifier/preset), 800 1333 (detector), '
                        '512 (segmentor)')
    p.add_argument('--patch-size', type=positive_int, nargs=3, default=None,
                   help='preset only: fixed patch size per SAR stage instead of the 14/7/2 grid')
    p.add_argument('--rate', type=float_in(0.0, 1.0), nargs='+', default=None,
                   help='assumed activation rate(s) in [0, 1]; default: 1.0 and the target rate')
    p.add_argument('--images', help='measure rates on the images of this folder (or file)')
    p.add_argument('--dataloader', action='store_true',
                   help="measure rates on the config's test dataloader")
    p.add_argument('--split', default='test', choices=['test', 'val', 'train'],
                   help='which dataloader of the config for --dataloader')
    p.add_argument('--num-images', type=positive_int, default=None,
                   help='images to measure (default all)')
    p.add_argument('--keep-ratio', action='store_true',
                   help='--images: fit inside --shape keeping the aspect ratio (mmdet style)')
    p.add_argument('--pad-divisor', type=int_in(1, 1024), default=1,
                   help='--images: pad to a multiple')
    p.add_argument('--num-classes', type=positive_int, default=None,
                   help='add a classifier head (GAP + FC) to the count; classifier configs '
                        "default to their head's num_classes")
    p.add_argument('--no-reference', action='store_true',
                   help='skip the plain counterpart (ResNet / ResNeXt / MobileNetV2 of the same '
                        'widths, strides and dilations) as a reference')
    p.add_argument('--out', help='JSON output path')
    p.add_argument('--hist',
                   help='histogram PNG path (default: next to --out, or ./flops_hist.png)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing --out / --hist file')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override config settings')
    args = p.parse_args(argv)
    if (args.config is None) == (args.preset is None):
        p.error('give either a config or --preset')
    if args.dataloader and args.config is None:
        p.error('argument --dataloader: needs a config')
    if args.dataloader and args.images:
        p.error('argument --images: not allowed with --dataloader')
    if args.patch_size and args.config is not None:
        p.error('argument --patch-size: only for --preset (a config sets its own patches)')
    if args.cfg_options and args.config is None:
        p.error('argument --cfg-options: only for a config, not --preset')
    measuring = bool(args.images or args.dataloader)
    if not measuring:
        for option, given in (('--num-images', args.num_images is not None),
                              ('--hist', args.hist is not None)):
            if given:
                p.error(f'argument {option}: needs --images or --dataloader')
    if not args.images:
        for option, given in (('--keep-ratio', args.keep_ratio),
                              ('--pad-divisor', args.pad_divisor != 1)):
            if given:
                p.error(f'argument {option}: needs --images')
    if measuring and args.hist is None:
        args.hist = (osp.splitext(args.out)[0] + '_hist.png' if args.out else 'flops_hist.png')
    inputs = [('config', args.config), ('--checkpoint', args.checkpoint),
              ('--images', args.images)]
    check_inputs_exist(p, inputs)
    for option, path in (('--out', args.out), ('--hist', args.hist)):
        check_output_file(p, option, path, args.overwrite, inputs)
    check_no_overlap(p, [('--out', args.out), ('--hist', args.hist)])
    return args


class _WithClassifierHead(nn.Module):
    """A backbone's last output, global average pooling and a linear head (mmpretrain's)."""

    def __init__(self, backbone: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        out = out[-1] if isinstance(out, (tuple, list)) else out
        return self.fc(self.pool(out).flatten(1))


def _plain_resnext(sar, num_classes: Optional[int]) -> Tuple[nn.Module, str]:
    """mmdet's ResNeXt with the SAR-ResNeXt's depth, cardinality, widths, strides, dilations."""
    stem = sar.stem[-3].out_channels if sar.deep_stem else sar.conv1.out_channels
    kwargs = dict(depth=sar.depth, groups=sar.cardinality, base_width=sar.base_width,
                  in_channels=sar.in_channels, stem_channels=stem,
                  base_channels=sar.stage_channels[0] // 4, deep_stem=sar.deep_stem,
                  strides=tuple(sar.strides), dilations=tuple(sar.dilations))
    if any(d > 1 for d in sar.dilations):
        # mmseg's ResNeXt is the one with contract_dilation (the OS8 setting).
        from mmseg.models.backbones import ResNeXt
        model, library = ResNeXt(contract_dilation=True, **kwargs), 'mmseg'
    else:
        from mmdet.models.backbones import ResNeXt
        model, library = ResNeXt(**kwargs), 'mmdet'
    name = f'{library} ResNeXt-{sar.depth} {sar.cardinality}x{sar.base_width}d'
    if num_classes:
        return _WithClassifierHead(model, sar.stage_channels[3], num_classes).eval(), \
            f'{name} (with head)'
    model.eval()
    return model, f'{name} (backbone)'


def _plain_mobilenet_v2(sar, num_classes: Optional[int]) -> Tuple[nn.Module, str]:
    """MobileNetV2 with the SAR-MobileNetV2's widen factor, strides and dilations.

    mmpretrain's (with its last 1x1 conv ``conv2``) when the SAR backbone has
    ``conv2`` and the standard strides, else mmseg's (strides, dilations, no ``conv2``).
    """
    standard = tuple(sar.strides) == (1, 2, 2, 2, 1, 2, 1) and \
        tuple(sar.dilations) == (1, ) * 7 and sar.in_channels == 3
    last = sar.num_outputs - 1
    if standard and hasattr(sar, 'conv2'):
        from mmpretrain.models.backbones import MobileNetV2
        model = MobileNetV2(widen_factor=sar.widen_factor, out_indices=(last, ))
        name = f'mmpretrain MobileNetV2 {sar.widen_factor:g}x'
    else:
        from mmseg.models.backbones import MobileNetV2
        model = MobileNetV2(widen_factor=sar.widen_factor, strides=tuple(sar.strides),
                            dilations=tuple(sar.dilations), out_indices=(min(last, 6), ))
        name = (f'mmseg MobileNetV2 {sar.widen_factor:g}x (strides {tuple(sar.strides)}, '
                f'dilations {tuple(sar.dilations)})')
    if num_classes:
        return _WithClassifierHead(model, sar.stage_channels[last], num_classes).eval(), \
            f'{name} (with head)'
    model.eval()  # (mmseg's train() does not return the module)
    return model, f'{name} (backbone)'


def reference_model(model: nn.Module, num_classes: Optional[int] = None
                    ) -> Tuple[Optional[nn.Module], str]:
    """The plain network a SAR backbone replaces (random weights, eval mode), and its name.

    Same widths, strides and dilations, so both are counted at the same
    feature resolutions: SAR-ResNet -> ResNet (:func:`reference_resnet`),
    SAR-ResNeXt -> mmdet's ResNeXt, SAR-MobileNetV2 -> mmpretrain's / mmseg's
    MobileNetV2. With ``num_classes`` the classifier head (global pooling +
    FC) is included.

    Returns:
        tuple: The model and its name, or ``(None, '')`` when there is none.
    """
    sar = get_sar_backbone(model)
    if isinstance(sar, SARMobileNetV2):
        return _plain_mobilenet_v2(sar, num_classes)
    if isinstance(sar, SARResNeXt):
        return _plain_resnext(sar, num_classes)
    return reference_resnet(sar, num_classes)


def reference_macs(backbone, shape, num_classes: Optional[int]) -> Tuple[Optional[float], str]:
    """MACs of :func:`reference_model` at ``shape`` (and its name)."""
    model, name = reference_model(backbone, num_classes)
    if model is None:
        return None, ''
    return float(count_macs(model, shape)[0]), name


def run(args: argparse.Namespace) -> Dict[str, object]:
    cfg, task, model, backbone = load_model(args.config, args.preset, args.checkpoint,
                                            args.patch_size, args.cfg_options)
    source = {'config': args.config} if args.config else {'preset': args.preset}
    source['task'] = task
    source['checkpoint'] = args.checkpoint
    num_classes = args.num_classes
    if num_classes is None and task == 'classifier':
        head = getattr(model, 'head', None)
        num_classes = getattr(head, 'num_classes', None)
    shape = args.shape or DEFAULT_SHAPES[task]
    if len(shape) == 1:
        shape = (shape[0], shape[0])
    input_shape = (backbone.in_channels, *shape)

    result: Dict[str, object] = dict(source, input_shape=list(input_shape),
                                     num_classes=num_classes, unit='MACs (paper convention)')
    rates = args.rate if args.rate is not None else sorted({1.0, backbone.target_rate})
    ref, ref_name = (None, '') if args.no_reference else \
        reference_macs(backbone, input_shape, num_classes)
    # One counting pass for every assumed rate: one row of per-block rates each.
    rate_rows = torch.tensor([[r] * backbone.num_masked_blocks for r in rates], dtype=torch.float64)
    base = assumed_rate_complexity(backbone, input_shape, rate_rows, num_classes=num_classes)
    result.update(
        params=base['params'],
        params_model=sum(p.numel() for p in model.parameters()),
        flops_dense=base['flops_dense'], flops_static=base['flops_static'],
        flops_refine=base['flops_refine'],
        flops_refine_per_stage=base['flops_refine_per_stage'],
        reference=None if ref is None else {'model': ref_name, 'flops': ref})
    assumed = []
    for rate, flops in zip(rates, base['flops_per_image']):
        entry = {'rate': rate, 'flops': flops}
        if ref:
            entry['flops_ratio_vs_reference'] = flops / ref
            entry['flops_reduction_vs_reference'] = 1 - flops / ref
        assumed.append(entry)
    result['assumed'] = assumed

    inputs = None
    if args.images:
        inputs = folder_inputs(args.images, tuple(shape), args.num_images, args.keep_ratio,
                               args.pad_divisor)
        result['measured_on'] = {'images': args.images, 'shape': list(shape),
                                 'keep_ratio': args.keep_ratio, 'pad_divisor': args.pad_divisor}
    elif args.dataloader:
        inputs = dataloader_inputs(model, cfg, args.num_images, args.split)
        result['measured_on'] = {'dataloader': f'{args.split}_dataloader'}
    if inputs is not None:
        measured = measure_rates(model, inputs)
        refs = None
        if not args.no_reference:
            refs = {}
            for s in set(measured['shapes']):
                refs[tuple(s)] = reference_macs(backbone, s, num_classes)[0]
            if any(v is None for v in refs.values()):
                refs = None
        stats = rate_statistics(backbone, measured, num_classes=num_classes,
                                reference_flops=refs)
        hist = args.hist or (osp.splitext(args.out)[0] + '_hist.png' if args.out
                             else 'flops_hist.png')
        name = args.preset or osp.splitext(osp.basename(args.config))[0]
        plot_rate_flops_histogram(
            stats, hist, title=f'{name}: {stats["num_images"]} images',
            reference_flops=stats.get('reference_flops'),
            reference_label=ref_name.split(' (')[0] or 'plain network')
        stats['histogram'] = hist
        result['measured'] = stats
    return result


def format_result(result: Dict[str, object]) -> str:
    g = 1e9
    head = f" + a {result['num_classes']}-class head" if result['num_classes'] else ''
    lines = [f"model: {result.get('config') or result.get('preset')} ({result['task']}), "
             f"input {tuple(result['input_shape'])}"
             + (f", with a {result['num_classes']}-class head" if result['num_classes'] else ''),
             f"params: {result['params'] / 1e6:.2f} M (backbone{head})"
             + (f", whole task model {result['params_model'] / 1e6:.2f} M"
                if result['task'] != 'preset' else ''),
             f"FLOPs (GMACs): dense {result['flops_dense'] / g:.3f}, "
             f"static {result['flops_static'] / g:.3f}, refine per stage at rate 1 "
             + ', '.join(f'{v / g:.3f}' for v in result['flops_refine_per_stage'])]
    ref = result.get('reference')
    if ref:
        lines.append(f"reference {ref['model']}: {ref['flops'] / g:.3f} GMACs")
    for entry in result['assumed']:
        extra = ''
        if 'flops_ratio_vs_reference' in entry:
            extra = (f"  ({entry['flops_ratio_vs_reference']:.3f}x the reference, "
                     f"{-entry['flops_reduction_vs_reference']:+.1%})")
        lines.append(f"rate {entry['rate']:.2f}: {entry['flops'] / g:.3f} GMACs{extra}")
    m = result.get('measured')
    if m:
        lines.append(f"measured on {m['num_images']} images: rate "
                     f"{m['activation_rate']['mean']:.3f} +- {m['activation_rate']['std']:.3f}; "
                     "per stage "
                     + ', '.join(f"{s['mean']:.3f}+-{s['std']:.3f}" for s in m['stage_rates']))
        # The inference (deterministic-mask) rates, one definition everywhere
        # (act_rate_stage{i}: the unweighted mean of a stage's block rates).
        lines.append('per-stage inference rates: '
                     + ' / '.join(f"{s['mean']:.3f}" for s in m['stage_rates'])
                     + f" (target t={m['target_rate']:.3f}, max |stage rate - t| = "
                     f"{m['max_stage_deviation']:.3f})")
        lines.append('per-block: ' + ' / '.join(f'{r:.3f}' for r in m['block_rates']))
        lines.append(f"  FLOPs {m['flops']['mean'] / g:.3f} +- {m['flops']['std'] / g:.3f} GMACs "
                     f"(min {m['flops']['min'] / g:.3f}, max {m['flops']['max'] / g:.3f})"
                     + (f"; {m['flops_ratio']:.3f}x the reference" if 'flops_ratio' in m else ''))
        lines.append(f"  histogram: {m['histogram']}")
    return '\n'.join(lines)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    result = run(args)
    print(format_result(result))
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
        print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    run_tool(main)
