"""Batch-1 CPU latency: torchvision ResNet-18/34/50 vs SAR-ResNet (dense-masked and sparse).

Every (threads, size, depth) combination is one interleaved timing run in one
process on one input: the ResNet backbone (with and without BN folding) and
SAR-ResNet at each activation rate (random patches at exactly that rate via
``set_mask_override``) through the dense masked path and the sparse path,
plus the masks a trained model picks (``--checkpoint``). Reports medians and
inter-quartile ranges, latency ratios against ResNet and the FLOPs ratio side
by side, and writes JSON and markdown.

Examples:
    # the full benchmark (BENCHMARKS.md)
    python tools/analysis/benchmark_latency.py --depths 18 34 50 \\
        --sizes 224x224 800x1216 --threads 1 0 --per-stage \\
        --out benchmarks/results/latency_mymachine.json
    # a tiny CI run
    python tools/analysis/benchmark_latency.py --depths 18 --sizes 64x64 \\
        --threads 1 --rates 0.5 1.0 --reps 2 --warmup 1 --out /tmp/lat.json
    # the fused native refine op against the PyTorch fallback, eager and compiled
    python tools/analysis/benchmark_latency.py --depths 50 --sizes 224x224 --threads 1 \\
        --rates 0.5 --refine-kernel native torch --compile --freezing
    # SAR-ResNeXt-50 / SAR-MobileNetV2 (deployed, dense and sparse) vs their plain counterparts
    python tools/analysis/benchmark_latency.py --arch mobilenet-v2 --sizes 224x224 \
        --threads 1 --rates 0.2 0.5 1.0
    # with the masks of a trained classifier on real images
    python tools/analysis/benchmark_latency.py --depths 50 --sizes 224x224 \\
        --config configs/sar_resnet/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py \\
        --checkpoint work_dirs/.../epoch_110.pth --images data/imagenet/val
"""
import argparse
import os.path as osp
import re
import sys
from pathlib import Path
from typing import Tuple, Union

from sar_backbones.inference import native
from sar_backbones.utils.cli import (MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, ArgumentParser,
                                     check_inputs_exist, check_report_paths, float_in, int_in,
                                     non_negative_int, positive_int, run_tool, size_in)

# The tools' shared modules import from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.arch_latency import ARCHS, format_arch_report, run_arch_benchmark  # noqa: E402
from benchmarks.latency import (LatencyConfig, run_latency_benchmark, save_report,  # noqa: E402
                                target_summary)
from benchmarks.timing import machine_info  # noqa: E402
from tools.analysis.model_builders import load_model  # noqa: E402

DEPTHS = (18, 34, 50, 101)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; a mistake exits 2 with one line naming the argument."""
    p = ArgumentParser(description=__doc__.split('\n\n')[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='resnet', choices=['resnet', *ARCHS],
                   help='resnet: SAR-ResNet-{depths} vs torchvision ResNets (the full '
                        'benchmark); resnext50-32x4d / mobilenet-v2: that SAR backbone (default '
                        'SAR options, deployed) dense and sparse vs its plain counterpart, at '
                        '--sizes, --threads, --rates')
    p.add_argument('--depths', type=int, nargs='+', default=[18, 34, 50], choices=DEPTHS)
    p.add_argument('--sizes', type=size_in(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE), nargs='+',
                   default=[(224, 224), (800, 1216)], help='HxW or H')
    p.add_argument('--threads', type=int_in(0, 4096), nargs='+', default=[1, 0],
                   help='0 = all logical CPUs')
    p.add_argument('--rates', type=float_in(0.0, 1.0), nargs='+',
                   default=[0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0],
                   help='activation rates of the random masks; 0 measures the floor (no patch '
                        'refined) that the target headroom table needs')
    p.add_argument('--variant', type=variant, default=(2, 2, 2, 1),
                   help='SAR variant besides depth, e.g. g2s2a2b1')
    p.add_argument('--reps', type=positive_int, default=20, help='timed rounds per case')
    p.add_argument('--reps-large', type=positive_int, default=None,
                   help='timed rounds for sizes above 224x224 (default: --reps)')
    p.add_argument('--depths-large', type=int, nargs='+', default=None, choices=DEPTHS,
                   help='depths for sizes above 224x224 (default: --depths)')
    p.add_argument('--warmup', type=non_negative_int, default=3, help='untimed rounds first')
    p.add_argument('--modes', nargs='+', default=['dense', 'sparse'], choices=['dense', 'sparse'])
    p.add_argument('--bn-fold', default='both', choices=['both', 'neither'],
                   help='fold BN into convs on both sides (SAR vs resnet+fold) or neither '
                        '(SAR vs plain resnet); the sparse refine path folds internally either way')
    p.add_argument('--channels-last', action='store_true', help='channels-last on both sides')
    p.add_argument('--compile', action='store_true',
                   help="also time torch.compile (inductor) of both networks: ResNet with BN "
                        "folded and SAR deployed (switch_to_deploy); '+compiled' rows, deploy "
                        'and compile times in the report')
    p.add_argument('--freezing', action='store_true',
                   help='torch._inductor.config.freezing for both compiled networks '
                        '(needs --compile)')
    p.add_argument('--refine-kernel', nargs='+', default=['auto'],
                   choices=list(native.KERNELS),
                   help="implementations of the sparse refine op, timed side by side "
                        "(SAR_REFINE_KERNEL): the first gives the 'sar{d}-sparse@r' rows "
                        "(targets, checks), each other one extra 'sar{d}-sparse[kernel]@r' rows; "
                        "e.g. --refine-kernel native torch")
    p.add_argument('--conv-backend', default='default', choices=['default', 'onednn'],
                   help="conv kernels on both sides: PyTorch's default dispatch, or oneDNN for "
                        'every conv (PyTorch sends batch-1 1x1 convs on one thread to THNN)')
    p.add_argument('--patch-mode', default='auto', choices=['auto', 'grid', 'size'],
                   help='auto: patch grid 14/7/2 at 224x224, patch size 4/4/7 px otherwise')
    p.add_argument('--patch-grid', type=positive_int, nargs=3, default=None, metavar='K',
                   help='patch grid per SAR stage in grid mode (default: 14 7 2)')
    p.add_argument('--patch-size', type=positive_int, nargs=3, default=None, metavar='P',
                   help='patch size in pixels per SAR stage in size mode (default: 4 4 7)')
    p.add_argument('--per-stage', action='store_true', help='time each stage/part with hooks')
    p.add_argument('--per-stage-reps', type=positive_int, default=5)
    p.add_argument('--per-stage-rates', type=float_in(0.0, 1.0), nargs='+', default=None,
                   help='rates for the per-stage breakdown (default: all)')
    p.add_argument('--profile', action='store_true', help='torch.profiler top ops of sparse SAR')
    p.add_argument('--profile-rate', type=float_in(0.0, 1.0), default=0.5)
    p.add_argument('--no-check', action='store_true', help='skip the sparse == dense check')
    p.add_argument('--config', help='config of a trained model (learned masks)')
    p.add_argument('--preset', help='backbone preset of a backbone-only --checkpoint')
    p.add_argument('--checkpoint', help='trained weights: the learned-mask cases use them')
    p.add_argument('--images', help='image file or folder for the learned-mask cases '
                   '(first image, resized to each size; default: the random input)')
    p.add_argument('--out', default=None,
                   help='JSON path (markdown next to it); default '
                        'benchmarks/results/latency_<machine>.json')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing --out JSON and its markdown')
    p.add_argument('--seed', type=non_negative_int, default=0)
    p.add_argument('--render', metavar='JSON',
                   help='only re-write the report (markdown and targets) of this existing '
                        'results JSON, in place')
    args = p.parse_args(argv)
    if args.render:
        if args.out is not None:
            p.error('argument --out: not allowed with --render (which re-writes its JSON)')
        if not osp.isfile(args.render):
            p.error(f'argument --render: no results JSON at {args.render}')
        return args
    if args.checkpoint is None:
        for option, value in (('--config', args.config), ('--preset', args.preset),
                              ('--images', args.images)):
            if value is not None:
                p.error(f'argument {option}: needs --checkpoint')
    elif (args.config is None) == (args.preset is None):
        p.error('argument --checkpoint: needs exactly one of --config and --preset')
    if args.freezing and not args.compile:
        p.error('argument --freezing: needs --compile')
    if len(set(args.refine_kernel)) != len(args.refine_kernel):
        p.error('argument --refine-kernel: each kernel at most once')
    if 'triton' in args.refine_kernel:
        p.error('argument --refine-kernel: triton runs on CUDA; this benchmark times the CPU')
    if 'native' in args.refine_kernel:
        if not native.load():
            p.error('argument --refine-kernel: the native kernel is not built; run '
                    f'`{native.BUILD_COMMAND}`')
    if args.per_stage_rates and not args.per_stage:
        p.error('argument --per-stage-rates: needs --per-stage')
    if args.arch != 'resnet':
        for option, given in (('--compile', args.compile), ('--per-stage', args.per_stage),
                              ('--profile', args.profile), ('--checkpoint', args.checkpoint),
                              ('--channels-last', args.channels_last),
                              ('--bn-fold', args.bn_fold != 'both')):
            if given:
                p.error(f'argument {option}: only with --arch resnet')
    if args.out is None:
        arch = '' if args.arch == 'resnet' else f'{args.arch}_'
        args.out = osp.join('benchmarks', 'results', f'latency_{arch}{machine_tag()}.json')
    inputs = [('--config', args.config), ('--checkpoint', args.checkpoint),
              ('--images', args.images)]
    check_inputs_exist(p, inputs)
    check_report_paths(p, args.out, args.overwrite, inputs)
    return args


def machine_tag() -> str:
    info = machine_info()
    tag = re.sub(r'[^a-z0-9]+', '-', str(info['cpu_model']).lower()).strip('-')
    return f"{tag}-{info['logical_cpus']}cpu"


def variant(text: str) -> Tuple[int, int, int, Union[int, float]]:
    """``type=`` of ``--variant``: ``g<G>s<s>a<alpha>b<beta>`` -> ``(G, s, alpha, beta)``."""
    m = re.fullmatch(r'g(\d+)s(\d+)a(\d+)b(\d+(?:\.\d+)?)', str(text).lower())
    if not m or min(int(m[1]), int(m[2]), int(m[3])) < 1 or float(m[4]) <= 0:
        raise argparse.ArgumentTypeError(
            f'must look like g2s2a2b1 (G, s, alpha >= 1, beta > 0), got {text!r}')
    beta = float(m[4])
    return int(m[1]), int(m[2]), int(m[3]), int(beta) if beta.is_integer() else beta


def _learned(args, sizes):
    """The trained backbone and the inputs its masks are measured on."""
    if args.checkpoint is None:
        return None, None
    backbone = load_model(args.config, None if args.config else args.preset,
                          args.checkpoint).backbone
    inputs = None
    if args.images:
        from sar_backbones.analysis.flops_stats import list_images, load_image_tensor
        path = list_images(args.images, 1)[0]
        inputs = {size: load_image_tensor(path, size) for size in sizes}
    return backbone.eval(), inputs


def render(path: str) -> dict:
    """Re-write ``<path>.md`` (and the targets) from a results JSON."""
    import json
    with open(path) as f:
        report = json.load(f)
    report['targets'] = target_summary(report)
    md = osp.splitext(path)[0] + '.md'
    save_report(report, path, md)
    print(f'wrote {path} and {md}')
    return report


def run_arch(args: argparse.Namespace, argv=None) -> dict:
    """``--arch resnext50-32x4d | mobilenet-v2``: :mod:`benchmarks.arch_latency`."""
    import datetime
    import json

    report = run_arch_benchmark(args.arch, [tuple(size) for size in args.sizes], args.threads,
                                args.rates, args.reps, args.warmup, args.seed,
                                log=lambda line: print(line, flush=True))
    sar = next(row['model'] for row in report['rows'] if row['case'] != 'plain')
    plain = next(row['model'] for row in report['rows'] if row['case'] == 'plain')
    report['meta'] = dict(
        machine_info(), date=datetime.datetime.now().isoformat(timespec='seconds'),
        command='python tools/analysis/benchmark_latency.py ' + ' '.join(
            sys.argv[1:] if argv is None else argv),
        arch=args.arch, sar=sar, plain=plain, reps=args.reps, warmup=args.warmup,
        seed=args.seed)
    report = dict(meta=report.pop('meta'), **report)
    md = osp.splitext(args.out)[0] + '.md'
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    markdown = format_arch_report(report)
    with open(md, 'w') as f:
        f.write(markdown)
    print(markdown)
    print(f'wrote {args.out} and {md}')
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    if args.arch != 'resnet':
        return run_arch(args, argv)
    sizes = [tuple(size) for size in args.sizes]
    reps_by_size = {}
    if args.reps_large is not None:
        reps_by_size = {f'{h}x{w}': args.reps_large for h, w in sizes if h * w > 224 * 224}
    depths_by_size = {}
    if args.depths_large is not None:
        depths_by_size = {f'{h}x{w}': args.depths_large for h, w in sizes if h * w > 224 * 224}
    learned, inputs = _learned(args, sizes)
    patches = {}  # LatencyConfig's defaults unless given
    if args.patch_grid:
        patches['patch_grid'] = tuple(args.patch_grid)
    if args.patch_size:
        patches['patch_size'] = tuple(args.patch_size)
    cfg = LatencyConfig(
        depths=args.depths, sizes=sizes, threads=args.threads, rates=args.rates,
        variant=args.variant, reps=args.reps, warmup=args.warmup,
        reps_by_size=reps_by_size, depths_by_size=depths_by_size, modes=args.modes,
        bn_fold=args.bn_fold,
        channels_last=args.channels_last, conv_backend=args.conv_backend,
        compile=args.compile, freezing=args.freezing,
        refine_kernels=tuple(args.refine_kernel),
        patch_mode=args.patch_mode, **patches, per_stage=args.per_stage,
        per_stage_reps=args.per_stage_reps, per_stage_rates=args.per_stage_rates,
        profile=args.profile, profile_rate=args.profile_rate, check=not args.no_check,
        seed=args.seed, learned_backbone=learned, learned_inputs=inputs)
    out = args.out
    # Models are built outside inference mode (their folded weights must stay
    # ordinary tensors); the timing itself runs under torch.inference_mode().
    report = run_latency_benchmark(cfg, log=lambda s: print(s, flush=True))
    env = ''.join(f'{k}={v} ' for k, v in report['meta'].get('env', {}).items())
    report['meta']['command'] = env + 'python tools/analysis/benchmark_latency.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv)
    md = osp.splitext(out)[0] + '.md'
    save_report(report, out, md)
    print(f'wrote {out} and {md}')
    return report


if __name__ == '__main__':
    run_tool(main)
