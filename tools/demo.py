"""The main job, end to end on generated data: pretrain, finetune, evaluate.

One command shows the whole pipeline on the CPU in minutes::

    python tools/demo.py --work-dir work_dirs/demo          # `make demo`
    python tools/demo.py --work-dir /tmp/demo --quick       # a few iterations per stage

Stages (each runs in-process with mmengine's ``Runner``; everything is
written under ``--work-dir``):

1. ``data``: ImageNet-, COCO- and VOC-format shape data sets
   (:mod:`sar_backbones.datasets.generate`) in ``<work-dir>/data``.
2. ``pretrain``: a SAR-ResNet18 classifier
   (``configs/demo/sar-resnet18-*_demo-shapes-64px.py``).
3. ``convert``: its backbone-only checkpoint
   (``tools/model_converters/sar2backbone.py``), checked against the
   detector's and the segmenter's backbones.
4. ``detection``: Faster R-CNN finetuning (``configs/demo/faster-rcnn_*``).
5. ``segmentation``: DeepLabV3 finetuning (``configs/demo/deeplabv3_*``).
6. ``evaluate``: top-1 / COCO bbox mAP / mIoU with the OpenMMLab metrics on
   the held-out splits, for the trained and for untrained (randomly
   initialised) models, and the activation rates measured there.
7. ``report``: backbone GMACs at the measured rates vs everything selected
   vs a plain ResNet18, the results table (``results.md``,
   ``results.json``) and overlays of the refined regions (``masks/``).

Each training stage writes its resolved config (data paths and checkpoint
filled in) next to its checkpoints; ``python tools/train.py <that config>``
and ``python tools/test.py <that config> <checkpoint>`` repeat a stage by
hand.
"""
import argparse
import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import os.path as osp
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# Run the package of this checkout, the one its configs were written for,
# even if the environment's editable install points at another checkout.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import sar_backbones  # noqa: F401,E402  (registries and compat fixes)
from sar_backbones.analysis.demo_report import (backbone_costs, mask_figure,  # noqa: E402
                                                results_markdown, stage_weights)
from sar_backbones.analysis.mask_vis import collect_masks  # noqa: E402
from sar_backbones.datasets import generate  # noqa: E402
from sar_backbones.engine import get_sar_backbone  # noqa: E402
from sar_backbones.utils.cli import ArgumentParser, int_in  # noqa: E402

CONFIG_DIR = REPO / 'configs' / 'demo'
BACKBONE_CKPT = 'sar-resnet18-g1s2a2b1_demo-shapes_backbone.pth'
# The libraries' prints and warnings of a stage go here, in its folder.
CONSOLE_LOG = 'console.txt'
STAGES = ('data', 'pretrain', 'convert', 'detection', 'segmentation', 'evaluate', 'report')

# Seconds each stage took in the default run on two idle cores (see
# docs/demo_results.md); only used to estimate the time left before a stage
# has run, and scaled by how fast the machine turns out to be.
NOMINAL_SECONDS = dict(
    data=5, pretrain=70, convert=1, detection=185, segmentation=225, evaluate=25,
    report=2)
QUICK_SECONDS = dict(
    data=2, pretrain=10, convert=3, detection=10, segmentation=10, evaluate=30, report=5)

# Data set sizes: per class for the classification set, images for COCO /
# VOC (the same scenes); tiny ones for --quick.
DATA_SIZES = dict(cls_num_train=200, cls_num_val=40, num_train=400, num_val=100)
QUICK_DATA_SIZES = dict(cls_num_train=8, cls_num_val=2, num_train=8, num_val=4)


@dataclass(frozen=True)
class Task:
    """One model of the pipeline and how to read its results."""

    name: str  # classification / detection / segmentation
    stage: str  # the training stage, also its folder in the work dir
    config: Path
    model: str
    metric_key: str  # key in the evaluator's metrics
    metric_name: str
    metric_scale: float  # to percent
    input_shape: Tuple[int, int, int]  # nominal (C, H, W) for the GMACs


TASKS = (
    Task('classification', 'pretrain',
         CONFIG_DIR / 'sar-resnet18-g1s2a2b1-t0.5_demo-shapes-64px.py',
         'SAR-ResNet18 classifier', 'accuracy/top1', 'top-1 (%)', 1.0, (3, 64, 64)),
    Task('detection', 'detection',
         CONFIG_DIR / 'faster-rcnn_sar-r18-g1s2a2b1-t0.5_fpn_demo-shapes-160px.py',
         'Faster R-CNN FPN', 'coco/bbox_mAP', 'bbox mAP (%)', 100.0, (3, 160, 160)),
    Task('segmentation', 'segmentation',
         CONFIG_DIR / 'deeplabv3_sar-r18-g1s2a2b1-t0.5-d8_demo-shapes-128x128.py',
         'DeepLabV3 D8', 'mIoU', 'mIoU (%)', 1.0, (3, 160, 160)),
)


# ------------------------------------------------------------------ progress
def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f'{seconds // 60}:{seconds % 60:02d}'


class Progress:
    """Prints where the run is: stage k/N, epoch, elapsed and time left.

    The time left in a stage comes from its measured pace; later stages are
    estimated from nominal durations scaled by how the finished work compared
    with its nominal duration.

    Args:
        nominal (dict): Expected seconds per stage.
        out (TextIO): Where to print (the real stdout, which stays visible
            while the libraries' output is captured).
    """

    def __init__(self, nominal: Dict[str, float], out: TextIO) -> None:
        self.nominal = nominal
        self.out = out
        self.start = time.perf_counter()
        self.durations: Dict[str, float] = {}
        # CPU seconds per stage: on a shared machine the wall time says more
        # about the neighbours than about the work.
        self.cpu: Dict[str, float] = {}
        self.current: Optional[str] = None
        self.stage_start = self.start
        self.stage_cpu = cpu_seconds()

    def print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        """Announce a stage, time it and report its duration."""
        self.current = name
        self.stage_start = time.perf_counter()
        self.stage_cpu = cpu_seconds()
        index = STAGES.index(name) + 1
        self.print(f'\n==> [{index}/{len(STAGES)}] {name}: {what}')
        yield
        took = time.perf_counter() - self.stage_start
        self.durations[name] = took
        self.cpu[name] = cpu_seconds() - self.stage_cpu
        self.current = None
        self.print(f'    {name} done in {_clock(took)} (CPU {_clock(self.cpu[name])}) | '
                   f'total {_clock(self.elapsed())}, ~{_clock(self.total_left(0.0, 1.0))} left')

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def total_left(self, stage_left: float, fraction: float) -> float:
        """Seconds left in the run given the current stage's estimate."""
        actual = sum(self.durations.values())
        nominal = sum(self.nominal[s] for s in self.durations)
        if self.current is not None:
            actual += time.perf_counter() - self.stage_start
            nominal += self.nominal[self.current] * fraction
        pace = actual / nominal if nominal > 0 else 1.0
        later = [s for s in STAGES if s not in self.durations and s != self.current]
        return stage_left + pace * sum(self.nominal[s] for s in later)

    def prefix(self) -> str:
        index = STAGES.index(self.current) + 1 if self.current else 0
        return f'[{index}/{len(STAGES)} {self.current}]'


class ProgressHook(Hook):
    """Prints training progress every ``interval`` seconds and per epoch."""

    priority = 'LOWEST'

    def __init__(self, progress: Progress, interval: float = 15.0) -> None:
        self.progress = progress
        self.interval = interval
        self._last = 0.0
        self._start = 0.0

    def before_train(self, runner) -> None:
        self._start = time.perf_counter()
        self._last = 0.0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        done = runner.iter + 1
        now = time.perf_counter()
        last = done == runner.max_iters
        epoch_end = runner.train_loop.__class__.__name__.startswith('Epoch') and \
            batch_idx + 1 == len(runner.train_dataloader)
        if not (last or epoch_end or now - self._last >= self.interval or done == 1):
            return
        self._last = now
        fraction = done / runner.max_iters
        stage_elapsed = now - self._start
        stage_left = stage_elapsed / fraction - stage_elapsed
        if hasattr(runner.train_loop, 'max_epochs') and runner.max_epochs > 1:
            where = f'epoch {runner.epoch + 1}/{runner.max_epochs} '
        else:
            where = ''
        where += f'iter {done}/{runner.max_iters} ({100 * fraction:.0f}%)'
        outputs = outputs or {}
        stats = []
        if 'loss' in outputs:
            stats.append(f"loss {float(outputs['loss']):.3f}")
        if 'act_rate' in outputs:
            target = get_sar_backbone(runner.model).target_rate
            stats.append(f"act_rate {float(outputs['act_rate']):.2f} (target {target:.2f})")
        self.progress.print(
            f'    {self.progress.prefix()} {where}  {"  ".join(stats)} | '
            f'{_clock(self.progress.elapsed())} elapsed, ~{_clock(stage_left)} left in stage, '
            f'~{_clock(self.progress.total_left(stage_left, fraction))} in total')


# ------------------------------------------------------------------- configs
def task_config(task: Task, work_dir: Path, data_root: Path, quick: bool) -> Config:
    """The task's demo config with this run's data, work dir and weights.

    Args:
        task (Task): Which model.
        work_dir (Path): The demo's work dir; the stage writes to a sub-folder.
        data_root (Path): Root of the generated (or real) data sets.
        quick (bool): Shorten training to a couple of iterations.

    Returns:
        Config: Ready for ``Runner.from_cfg``.
    """
    cfg = Config.fromfile(str(task.config))
    cfg.work_dir = str(work_dir / task.stage)
    loaders = [cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader]
    if task.name == 'classification':
        for loader in loaders:
            loader.dataset.data_root = str(data_root / 'imagenet')
    elif task.name == 'detection':
        coco = data_root / 'coco'
        for loader in loaders:
            loader.dataset.data_root = str(coco)
        ann_file = str(coco / 'annotations' / 'instances_val2017.json')
        cfg.val_evaluator.ann_file = ann_file
        cfg.test_evaluator.ann_file = ann_file
    else:
        for loader in loaders:
            loader.dataset.data_root = str(data_root / 'VOCdevkit' / 'VOC2012')
    if task.name != 'classification':
        cfg.model.backbone.init_cfg.checkpoint = str(work_dir / 'pretrain' / BACKBONE_CKPT)
    if quick:
        _shorten(cfg)
    return cfg


def _shorten(cfg: Config) -> None:
    """Train for one tiny epoch (or two iterations) and checkpoint at its end."""
    if cfg.train_cfg.get('by_epoch', True) and 'max_iters' not in cfg.train_cfg:
        cfg.train_cfg.max_epochs = 1
        cfg.train_cfg.val_interval = 1
        cfg.default_hooks.checkpoint.interval = 1
    else:
        cfg.train_cfg.max_iters = 2
        cfg.train_cfg.val_interval = 2
        cfg.default_hooks.checkpoint.interval = 2


def _without_validation(cfg: Config) -> Config:
    """A copy that trains without the end-of-training validation.

    The ``evaluate`` stage tests the saved checkpoint instead, so validating
    the same split at the end of training would only cost time.
    """
    cfg = copy.deepcopy(cfg)
    cfg.val_dataloader = None
    cfg.val_evaluator = None
    cfg.val_cfg = None
    return cfg


def _unique_name(cfg: Config, label: str) -> None:
    """Give the runner's logger, visualizer and message hub their own names.

    mmengine keeps them as named singletons; two runners built in the same
    second from the same config file, or configs that fix the visualizer's
    name (mmdet, mmseg), would otherwise share instances.
    """
    name = f'demo_{label}_{time.strftime("%Y%m%d_%H%M%S")}_{time.perf_counter_ns()}'
    cfg.experiment_name = name
    if cfg.get('visualizer') is not None:
        cfg.visualizer.name = name


@contextlib.contextmanager
def _captured(verbose: bool, path: Path) -> Iterator[None]:
    """Send the libraries' prints and warnings to a file in the stage's folder.

    pycocotools prints its evaluation, mmengine its environment and config,
    and the pinned libraries warn about their own deprecations; the console
    keeps the demo's progress lines. Exceptions still propagate.
    """
    if verbose:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a') as stream, contextlib.redirect_stdout(stream), \
            contextlib.redirect_stderr(stream):
        yield


def build_runner(cfg: Config, label: str, verbose: bool, log_path: Path) -> Runner:
    """Build a Runner whose console log shows errors only (unless verbose).

    The full INFO log still goes to the runner's log file in its work dir.
    """
    cfg = copy.deepcopy(cfg)
    _unique_name(cfg, label)
    with _captured(verbose, log_path):
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if not verbose:
        for handler in runner.logger.handlers:
            if type(handler) is logging.StreamHandler:
                # Built while stdout was captured (into a file now closed):
                # point it back at the console. ``setStream`` would flush
                # the closed file first.
                handler.stream = sys.stdout
                handler.setLevel(logging.ERROR)
    return runner


def last_checkpoint(work_dir: str) -> str:
    """Path of the checkpoint a training run saved last."""
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        path = f.read().strip()
    if not osp.isfile(path):
        raise FileNotFoundError(f'training in {work_dir} left no checkpoint at {path}')
    return path


# -------------------------------------------------------------------- stages
def make_data(data_root: Path, quick: bool, dry_run: bool = False) -> dict:
    """Generate the three data sets (stage ``data``); ``dry_run`` only checks that it can."""
    sizes = QUICK_DATA_SIZES if quick else DATA_SIZES
    return generate.generate_all(data_root, dry_run=dry_run, **sizes)


def train(task: Task, cfg: Config, progress: Progress, verbose: bool) -> Dict[str, str]:
    """Train one model (stages ``pretrain``, ``detection``, ``segmentation``).

    Returns:
        dict: ``config`` (source), ``resolved_config`` and ``checkpoint``.
    """
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    resolved = work_dir / task.config.name
    cfg.dump(str(resolved))
    progress.print(f'    config:     {osp.relpath(task.config, REPO)}\n'
                   f'    resolved:   {resolved}\n'
                   f'    by hand:    python tools/train.py {resolved} --work-dir {work_dir}')
    runner = build_runner(_without_validation(cfg), task.stage, verbose, work_dir / CONSOLE_LOG)
    runner.register_hook(ProgressHook(progress), priority='LOWEST')
    with _captured(verbose, work_dir / CONSOLE_LOG):
        runner.train()
    checkpoint = last_checkpoint(str(work_dir))
    progress.print(f'    checkpoint: {checkpoint}')
    return dict(config=str(task.config), resolved_config=str(resolved), checkpoint=checkpoint)


def _load_converter():
    """``tools/model_converters/sar2backbone.py`` as a module."""
    path = REPO / 'tools' / 'model_converters' / 'sar2backbone.py'
    spec = importlib.util.spec_from_file_location('sar2backbone', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert(pretrain_ckpt: str, dst: Path, check_configs: Sequence[str],
            progress: Progress) -> str:
    """Write the backbone-only checkpoint and check it fits every downstream backbone."""
    converter = _load_converter()
    with contextlib.redirect_stdout(io.StringIO()):
        # The demo owns its work dir (checked in main): a re-run replaces its own output.
        state_dict = converter.convert(pretrain_ckpt, str(dst), overwrite=True)
    for config in check_configs:
        backbone = converter.build_backbone_from_config(config)
        converter.check_backbone_state_dict(backbone, state_dict, source=str(dst))
        progress.print(f'    {len(state_dict)} tensors fit the backbone of {osp.basename(config)}')
    progress.print(f'    by hand:    python tools/model_converters/sar2backbone.py '
                   f'{pretrain_ckpt} {dst}')
    return str(dst)


def evaluate(task: Task, cfg: Config, checkpoint: Optional[str], label: str,
             verbose: bool) -> Tuple[Dict[str, float], List[float], Runner]:
    """Test a model on the held-out split with the config's evaluator.

    Args:
        task (Task): Which model.
        cfg (Config): Its config.
        checkpoint (str, optional): Trained weights; None evaluates the
            randomly initialised model (what training starts from, without
            the pretrained backbone).
        label (str): Sub-folder of ``<work-dir>/evaluate/<task>``.
        verbose (bool): Show the libraries' logs.

    Returns:
        tuple: The metrics, the mean activation rate of every masked block
        over the split, and the runner (for the mask overlays).
    """
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(Path(cfg.work_dir).parent / 'evaluate' / task.name / label)
    cfg.load_from = checkpoint
    if checkpoint is None:
        cfg.model.backbone.init_cfg = None
    runner = build_runner(cfg, f'{task.name}_{label}', verbose,
                          Path(cfg.work_dir) / CONSOLE_LOG)
    if checkpoint is None:
        runner.model.init_weights()
    backbone = get_sar_backbone(runner.model)
    rows: List[torch.Tensor] = []

    def record(module, args, output) -> None:
        if not module.training:
            rows.append(module.get_activation_rates().detach().float().cpu())

    handle = backbone.register_forward_hook(record)
    try:
        with _captured(verbose, Path(cfg.work_dir) / CONSOLE_LOG):
            metrics = runner.test()
    finally:
        handle.remove()
    block_rates = torch.cat(rows).mean(0).tolist()
    return dict(metrics), block_rates, runner


def _display_image(inputs: torch.Tensor, preprocessor, sample) -> np.ndarray:
    """Undo the normalisation and padding of one preprocessed image (RGB uint8)."""
    mean = preprocessor.mean.view(-1, 1, 1).cpu()
    std = preprocessor.std.view(-1, 1, 1).cpu()
    image = (inputs[0].cpu() * std + mean).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    height, width = sample.metainfo.get('img_shape', image.shape[:2])[:2]
    return image[:height, :width]


def draw_masks(task: Task, runner: Runner, out_file: Path, num_images: int) -> float:
    """Overlay what the trained model refines on a few held-out images.

    Images are spread over the held-out split (it is sorted by class for
    classification) and run one at a time, at the size the test pipeline
    gives them.

    Returns:
        float: Mean activation rate of the shown images.
    """
    model = runner.model
    model.eval()
    dataset = runner.test_dataloader.dataset
    indices = np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).round()
    images, weights, rates = [], [], []
    for index in indices.astype(int):
        with torch.no_grad():
            data = model.data_preprocessor(pseudo_collate([dataset[int(index)]]), False)
        image = _display_image(data['inputs'], model.data_preprocessor, data['data_samples'][0])
        collected = collect_masks(model, data['inputs'], image_size=image.shape[:2])
        images.append(image)
        weights.append(stage_weights(collected))
        rates.append(float(np.mean(collected['rates'])))
    scale = 3 if task.name == 'classification' else 2
    figure = mask_figure(
        images, weights, f'{task.model}: regions refined per SAR stage (tinted); '
        'the rest only runs through the cheap base branch', scale=scale)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out_file)
    return float(np.mean(rates))


# -------------------------------------------------------------------- report
def machine_info() -> Dict[str, object]:
    """CPU model, core count and the library versions of this run."""
    model = platform.processor() or 'unknown'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    import mmdet
    import mmengine
    import mmpretrain
    import mmseg
    return dict(cpu=model, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__,
                mmengine=mmengine.__version__, mmdet=mmdet.__version__,
                mmseg=mmseg.__version__, mmpretrain=mmpretrain.__version__)


def write_report(work_dir: Path, rows: List[dict], extra: dict) -> Tuple[Path, Path, str]:
    """Save ``results.md`` and ``results.json``; return their paths and the table."""
    table = results_markdown(rows)
    info = extra['machine']
    lines = [
        '# SAR-ResNet demo results', '',
        table,
        'Untrained: the same model randomly initialised (no pretraining), evaluated on the '
        'same held-out split. Act. rate: mean share of refined patches over the held-out '
        'split (deterministic masks, as at inference), target rate in brackets. GMACs: '
        'backbone multiply-accumulates of one image at the given input size ("FLOPs" as '
        'the paper counts them), at the measured rates, with every region selected, and '
        'for a plain ResNet18 with the same stem, strides and dilations.', '',
        f"Wall time {_clock(extra['wall_seconds'])} (CPU time {_clock(extra['cpu_seconds'])}) "
        f"on {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads.",
        '',
    ]
    markdown = work_dir / 'results.md'
    markdown.write_text('\n'.join(lines))
    json_path = work_dir / 'results.json'
    json_path.write_text(json.dumps(dict(rows=rows, **extra), indent=2) + '\n')
    return markdown, json_path, table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; a mistake exits 2 with one line naming the argument."""
    parser = ArgumentParser(
        description='Pretrain, finetune and evaluate SAR-ResNet on generated data (CPU demo)')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='where every stage writes (default: work_dirs/demo); must be new '
                        'or empty unless --overwrite')
    parser.add_argument('--data-root', default=None,
                        help='data sets root (default: <work-dir>/data)')
    parser.add_argument('--skip-data', action='store_true',
                        help='use the data already in --data-root instead of generating it')
    parser.add_argument('--quick', action='store_true',
                        help='tiny data and a couple of iterations per stage (for tests)')
    parser.add_argument('--num-vis', type=int_in(1, 64), default=4,
                        help='held-out images per task in the mask overlays (1-64, default: 4)')
    parser.add_argument('--overwrite', action='store_true',
                        help='run again into a --work-dir that holds an earlier run (its '
                        'checkpoints, results and overlays are replaced)')
    parser.add_argument('--verbose', action='store_true',
                        help='show the OpenMMLab logs on the console too')
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir).absolute()
    data_root = Path(args.data_root).absolute() if args.data_root else work_dir / 'data'
    if data_root.exists() and not data_root.is_dir():
        parser.error(f'argument --data-root: {data_root} is not a directory')
    if args.skip_data and not (data_root / generate.INFO_FILE).is_file():
        parser.error(f'argument --skip-data: no generated data in {data_root} '
                     f'({generate.INFO_FILE} missing)')
    if work_dir.exists() and not work_dir.is_dir():
        parser.error(f'argument --work-dir: {work_dir} is not a directory')
    if not args.skip_data:
        try:  # what the data stage will write, checked before any stage runs
            make_data(data_root, args.quick, dry_run=True)
        except (ValueError, OSError) as error:
            parser.error(f'argument --data-root: {error}')
    # The data sets may live inside the work dir; the generator guards them itself.
    earlier = [p for p in work_dir.iterdir() if p != data_root] if work_dir.is_dir() else []
    if earlier and not args.overwrite:
        parser.error(f'argument --work-dir: {work_dir} is not empty (e.g. {earlier[0].name}); '
                     'pass --overwrite to run again into it')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the pipeline; return the content of ``results.json``."""
    args = parse_args(argv)
    work_dir = Path(args.work_dir).absolute()
    data_root = Path(args.data_root).absolute() if args.data_root else work_dir / 'data'
    work_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(QUICK_SECONDS if args.quick else NOMINAL_SECONDS, sys.stdout)
    cpu_start = cpu_seconds()
    progress.print(f'SAR-ResNet demo -> {work_dir}' + (' (quick)' if args.quick else ''))

    with progress.stage('data', f'shape data sets in {data_root}'):
        if args.skip_data:
            progress.print('    skipped (--skip-data)')
        else:
            info = make_data(data_root, args.quick)
            for name, entry in info['tasks'].items():
                counts = entry.get('num_images') or {
                    split: value['images'] for split, value in entry['splits'].items()}
                progress.print(f'    {name}: {counts}')

    configs = {task.name: task_config(task, work_dir, data_root, args.quick) for task in TASKS}
    cls_task, det_task, seg_task = TASKS
    runs: Dict[str, Dict[str, str]] = {}
    with progress.stage('pretrain', 'SAR-ResNet18 classifier on the ImageNet-style set'):
        runs['classification'] = train(cls_task, configs['classification'], progress,
                                       args.verbose)
    with progress.stage('convert', 'backbone-only checkpoint for finetuning'):
        backbone_ckpt = convert(
            runs['classification']['checkpoint'], work_dir / 'pretrain' / BACKBONE_CKPT,
            [str(det_task.config), str(seg_task.config)], progress)
    with progress.stage('detection', 'finetune Faster R-CNN on the COCO-style set'):
        runs['detection'] = train(det_task, configs['detection'], progress, args.verbose)
    with progress.stage('segmentation', 'finetune DeepLabV3 on the VOC-style set'):
        runs['segmentation'] = train(seg_task, configs['segmentation'], progress,
                                     args.verbose)

    evaluations = {}
    with progress.stage('evaluate', 'trained vs untrained models on the held-out splits'):
        for task in TASKS:
            start = time.perf_counter()
            untrained, _, _ = evaluate(task, configs[task.name], None, 'untrained',
                                       args.verbose)
            trained, rates, runner = evaluate(task, configs[task.name],
                                              runs[task.name]['checkpoint'], 'trained',
                                              args.verbose)
            evaluations[task.name] = (untrained, trained, rates, runner)
            progress.print(
                f'    {progress.prefix()} {task.name}: {task.metric_name} '
                f'{task.metric_scale * untrained[task.metric_key]:.1f} untrained -> '
                f'{task.metric_scale * trained[task.metric_key]:.1f} trained, '
                f'activation rate {np.mean(rates):.2f} '
                f'({_clock(time.perf_counter() - start)})')
            progress.print(f'    by hand:    python tools/test.py '
                           f'{runs[task.name]["resolved_config"]} '
                           f'{runs[task.name]["checkpoint"]}')

    rows = []
    with progress.stage('report', 'GMACs, results table and mask overlays'):
        for task in TASKS:
            untrained, trained, rates, runner = evaluations[task.name]
            backbone = get_sar_backbone(runner.model)
            costs = backbone_costs(backbone, task.input_shape, rates)
            overlay = work_dir / 'masks' / f'{task.name}.png'
            draw_masks(task, runner, overlay, args.num_vis)
            rows.append(dict(
                task=task.name, model=task.model, input_shape=list(task.input_shape),
                metric_name=task.metric_name, metric_key=task.metric_key,
                untrained=task.metric_scale * float(untrained[task.metric_key]),
                trained=task.metric_scale * float(trained[task.metric_key]),
                act_rate=float(np.mean(rates)), block_rates=[float(r) for r in rates],
                target_rate=float(backbone.target_rate),
                inference_mode=str(backbone.inference_mode),
                **{k: float(v) for k, v in costs.items()},
                metrics_untrained=_plain_metrics(untrained),
                metrics_trained=_plain_metrics(trained),
                mask_overlay=str(overlay), **runs[task.name]))
            progress.print(f'    masks:      {overlay}')
        extra = dict(
            wall_seconds=progress.elapsed(), cpu_seconds=cpu_seconds() - cpu_start,
            stage_seconds=dict(progress.durations), stage_cpu_seconds=dict(progress.cpu),
            quick=args.quick,
            backbone_checkpoint=backbone_ckpt, data_root=str(data_root),
            machine=machine_info())
        # The report stage itself is still running: count it in.
        extra['stage_seconds']['report'] = time.perf_counter() - progress.stage_start
        extra['stage_cpu_seconds']['report'] = cpu_seconds() - progress.stage_cpu
        markdown, json_path, table = write_report(work_dir, rows, extra)

    progress.print('\n' + table)
    progress.print(f'Results: {markdown} and {json_path}; mask overlays in {work_dir / "masks"}')
    progress.print(f'Total: {_clock(progress.elapsed())} wall, '
                   f'{_clock(cpu_seconds() - cpu_start)} CPU')
    return json.loads(json_path.read_text())


def _plain_metrics(metrics: Dict[str, object]) -> Dict[str, float]:
    """Metrics as JSON-friendly floats (numbers only)."""
    plain = {}
    for key, value in metrics.items():
        try:
            plain[key] = float(value)
        except (TypeError, ValueError):
            continue
    return plain


if __name__ == '__main__':
    main()
