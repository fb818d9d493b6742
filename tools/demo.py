"""The main job, end to end on generated data: pretrain, finetune, evaluate.

One command shows the whole pipeline on the CPU in minutes::

    python tools/demo.py --work-dir work_dirs/demo          # `make demo`
    python tools/demo.py --work-dir /tmp/demo --quick       # a few iterations per stage

Every stage runs one of the repository's tools in its own process, with the
command line printed, so that each step can be repeated by hand (everything
is written under ``--work-dir``; each tool's output goes to ``console.txt``
in its folder unless ``--verbose``):

1. ``data``: ``tools/datasets/generate_shape_datasets.py`` writes ImageNet-,
   COCO- and VOC-format shape data sets into ``<work-dir>/data``.
2. ``pretrain``: ``tools/train.py`` trains a SAR-ResNet18 classifier
   (``configs/demo/sar-resnet18-*_demo-shapes-64px.py``).
3. ``convert``: ``tools/model_converters/sar2backbone.py`` writes its
   backbone-only checkpoint, checked against the detector's and the
   segmenter's backbones.
4. ``detection``: ``tools/train.py`` finetunes Faster R-CNN (``configs/demo/faster-rcnn_*``).
5. ``segmentation``: ``tools/train.py`` finetunes DeepLabV3 (``configs/demo/deeplabv3_*``).
6. ``evaluate``: ``tools/test.py`` measures top-1 / COCO bbox mAP / mIoU and
   the activation rates on the held-out splits, for the trained and for
   untrained (randomly initialised) models.
7. ``report``: ``tools/analysis/get_flops.py`` counts the all-selected and
   the plain-ResNet GMACs, ``tools/analysis/visualize_masks.py`` draws the
   refined regions (``masks/``), and the results table is written
   (``results.md``, ``results.json``).

Each training stage writes its resolved config (data paths, checkpoint and
``--seed`` filled in) next to its checkpoints.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import set_random_seed

REPO = Path(__file__).resolve().parents[1]
# Run the package and the tools of this checkout, the ones its configs were
# written for, even if the environment's editable install points elsewhere.
sys.path.insert(0, str(REPO))
from benchmarks.timing import machine_info  # noqa: E402
from sar_backbones.utils.cli import ArgumentParser, int_in, non_negative_int  # noqa: E402
from tools.datasets.generate_shape_datasets import INFO_FILE, generate_all  # noqa: E402

CONFIG_DIR = REPO / 'configs' / 'demo'
BACKBONE_CKPT = 'sar-resnet18-g1s2a2b1_demo-shapes_backbone.pth'
CONSOLE_LOG = 'console.txt'
STAGES = ('data', 'pretrain', 'convert', 'detection', 'segmentation', 'evaluate', 'report')

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
# Training without the end-of-training validation: the evaluate stage tests
# the saved checkpoint on the same split.
NO_VALIDATION = ['--cfg-options', 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of the tools it ran."""
    usages = (resource.getrusage(resource.RUSAGE_SELF),
              resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f'{seconds // 60}:{seconds % 60:02d}'


class Stages:
    """Announces each stage, times it, and runs the tools."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.perf_counter()
        self.seconds: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.stage_start, self.stage_cpu = self.start, 0.0

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.stage_start = start = time.perf_counter()
        self.stage_cpu = cpu = cpu_seconds()
        print(f'\n==> [{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}', flush=True)
        yield
        self.seconds[name] = time.perf_counter() - start
        self.cpu[name] = cpu_seconds() - cpu
        print(f'    {name} done in {_clock(self.seconds[name])} (CPU {_clock(self.cpu[name])}), '
              f'total {_clock(self.elapsed())}', flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, script: str, *args: object, log_dir: Path) -> None:
        """Run ``python <script> <args>``; its output goes to ``log_dir/console.txt``."""
        command = [sys.executable, str(REPO / script), *map(str, args)]
        print(f'    $ python {script} {" ".join(map(str, args))}', flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])]))
        if self.verbose:
            code = subprocess.run(command, env=env).returncode
        else:
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / CONSOLE_LOG, 'a') as log:
                code = subprocess.run(command, env=env, stdout=log,
                                      stderr=subprocess.STDOUT).returncode
        if code != 0:
            where = '' if self.verbose else f'; its output is in {log_dir / CONSOLE_LOG}'
            raise SystemExit(f'demo: {script} failed with exit status {code}{where}')


# ------------------------------------------------------------------- configs
def write_config(task: Task, work_dir: Path, data_root: Path, quick: bool,
                 seed: Optional[int]) -> Path:
    """Write the task's demo config with this run's data, work dir, weights and seed."""
    cfg = Config.fromfile(str(task.config))
    cfg.work_dir = str(work_dir / task.stage)
    root = dict(classification=data_root / 'imagenet', detection=data_root / 'coco',
                segmentation=data_root / 'VOCdevkit' / 'VOC2012')[task.name]
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = str(root)
    if task.name == 'detection':
        cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = str(
            root / 'annotations' / 'instances_val2017.json')
    if task.name != 'classification':
        cfg.model.backbone.init_cfg.checkpoint = str(work_dir / 'pretrain' / BACKBONE_CKPT)
    if seed is not None:
        cfg.randomness = dict(seed=seed)
    for hook in cfg.custom_hooks:
        if hook.type == 'sar_backbones.SARRateLoggerHook':
            # GMACs at the nominal size with the split's mean rate of every block.
            hook.flops_input_shape = task.input_shape
    if quick:  # one tiny epoch (or two iterations), checkpointed at its end
        if cfg.train_cfg.get('by_epoch', True) and 'max_iters' not in cfg.train_cfg:
            cfg.train_cfg.update(max_epochs=1, val_interval=1)
            cfg.default_hooks.checkpoint.interval = 1
        else:
            cfg.train_cfg.update(max_iters=2, val_interval=2)
            cfg.default_hooks.checkpoint.interval = 2
        for hook in cfg.custom_hooks:
            if hook.type == 'sar_backbones.SARRateCalibrationHook':
                hook.num_batches = 1  # the hook runs, on one batch
    path = work_dir / task.stage / task.config.name
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg.dump(str(path))
    return path


def save_untrained(config: Path, dst: Path) -> str:
    """Save the randomly initialised model of ``config`` (what training starts from)."""
    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.default_scope)
    # The current logger then prints warnings only: init_weights() lists every tensor.
    MMLogger.get_instance('sar_demo_untrained', log_level='WARNING')
    set_random_seed(cfg.randomness.seed)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict=model.state_dict(), meta=dict(untrained=True)), dst)
    return str(dst)


def last_checkpoint(work_dir: Path) -> str:
    """Path of the checkpoint a training run saved last."""
    path = (work_dir / 'last_checkpoint').read_text().strip()
    if not os.path.isfile(path):
        raise FileNotFoundError(f'training in {work_dir} left no checkpoint at {path}')
    return path


def test_metrics(work_dir: Path) -> Dict[str, float]:
    """The metrics ``tools/test.py`` logged in ``work_dir`` (its latest run)."""
    logs = sorted(work_dir.glob('*/*.json'))
    if not logs:
        raise FileNotFoundError(f'tools/test.py left no metrics in {work_dir}')
    return {k: float(v) for k, v in json.loads(logs[-1].read_text()).items()
            if isinstance(v, (int, float))}


# -------------------------------------------------------------------- report
COLUMNS = (('Task', 'task'), ('Model (input)', 'model'), ('Metric', 'metric_name'),
           ('Untrained', 'untrained'), ('Trained', 'trained'), ('Act. rate (target)', 'rate'),
           ('Backbone GMACs', 'gmacs'), ('All selected', 'gmacs_all_selected'),
           ('Plain ResNet', 'gmacs_resnet'), ('Saving vs ResNet', 'saving_vs_resnet'))


def results_markdown(rows: List[dict]) -> str:
    """The results table in Markdown, one row per task."""
    lines = ['| ' + ' | '.join(title for title, _ in COLUMNS) + ' |',
             '|' + '|'.join(' --- ' for _ in COLUMNS) + '|']
    for row in rows:
        cells = dict(row, model=f"{row['model']} ({'x'.join(map(str, row['input_shape'][1:]))})",
                     untrained=f"{row['untrained']:.1f}", trained=f"**{row['trained']:.1f}**",
                     rate=f"{row['act_rate']:.2f} ({row['target_rate']:.2f})",
                     saving_vs_resnet=f"{100 * row['saving_vs_resnet']:.1f}%",
                     **{k: f'{row[k]:.3f}' for k in ('gmacs', 'gmacs_all_selected',
                                                     'gmacs_resnet')})
        lines.append('| ' + ' | '.join(str(cells[key]) for _, key in COLUMNS) + ' |')
    return '\n'.join(lines) + '\n'


def write_report(work_dir: Path, rows: List[dict], extra: dict) -> Tuple[Path, Path, str]:
    """Save ``results.md`` and ``results.json``; return their paths and the table."""
    table = results_markdown(rows)
    info = extra['machine']
    lines = [
        '# SAR-ResNet demo results', '', table,
        'Untrained: the same model randomly initialised (no pretraining), evaluated on the '
        'same held-out split. Act. rate: mean share of refined patches over the held-out '
        'split (deterministic masks, as at inference), target rate in brackets. GMACs: '
        'backbone multiply-accumulates of one image at the given input size ("FLOPs" as '
        'the paper counts them), at the measured rates, with every region selected, and '
        'for a plain ResNet18 with the same stem, strides and dilations (tools/analysis/'
        'get_flops.py; for the classifier these two include its 5-class head).', '',
        f"Wall time {_clock(extra['wall_seconds'])} (CPU time {_clock(extra['cpu_seconds'])}) "
        f"on {info['cpu_model']}, {info['logical_cpus']} cores, {info['default_threads']} "
        'torch threads.', '']
    markdown, json_path = work_dir / 'results.md', work_dir / 'results.json'
    markdown.write_text('\n'.join(lines))
    json_path.write_text(json.dumps(dict(rows=rows, **extra), indent=2) + '\n')
    return markdown, json_path, table


# ---------------------------------------------------------------- the job
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
    parser.add_argument('--seed', type=non_negative_int, default=None,
                        help="random seed of every training and test run (default: the "
                        "configs' own, 0); the data sets do not depend on it")
    parser.add_argument('--num-vis', type=int_in(1, 64), default=4,
                        help='held-out images per task in the mask overlays (1-64, default: 4)')
    parser.add_argument('--overwrite', action='store_true',
                        help='run again into a --work-dir that holds an earlier run (its '
                        'checkpoints, results and overlays are replaced)')
    parser.add_argument('--verbose', action='store_true',
                        help="show the tools' output on the console instead of console.txt")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir).absolute()
    data_root = Path(args.data_root).absolute() if args.data_root else work_dir / 'data'
    if data_root.exists() and not data_root.is_dir():
        parser.error(f'argument --data-root: {data_root} is not a directory')
    if args.skip_data and not (data_root / INFO_FILE).is_file():
        parser.error(f'argument --skip-data: no generated data in {data_root} '
                     f'({INFO_FILE} missing)')
    if work_dir.exists() and not work_dir.is_dir():
        parser.error(f'argument --work-dir: {work_dir} is not a directory')
    if not args.skip_data:
        try:  # what the data stage will write, checked before any stage runs
            generate_all(data_root, dry_run=True, **data_sizes(args.quick))
        except (ValueError, OSError) as error:
            parser.error(f'argument --data-root: {error}')
    # The data sets may live inside the work dir; the generator guards them itself.
    earlier = [p for p in work_dir.iterdir() if p != data_root] if work_dir.is_dir() else []
    if earlier and not args.overwrite:
        parser.error(f'argument --work-dir: {work_dir} is not empty (e.g. {earlier[0].name}); '
                     'pass --overwrite to run again into it')
    return args


def data_sizes(quick: bool) -> Dict[str, int]:
    """Arguments of the generator: images per class (ImageNet) and per split (COCO / VOC)."""
    return QUICK_DATA_SIZES if quick else DATA_SIZES


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the pipeline; return the content of ``results.json``."""
    args = parse_args(argv)
    work_dir = Path(args.work_dir).absolute()
    data_root = Path(args.data_root).absolute() if args.data_root else work_dir / 'data'
    work_dir.mkdir(parents=True, exist_ok=True)
    stages, cpu_start = Stages(args.verbose), cpu_seconds()
    print(f'SAR-ResNet demo -> {work_dir}' + (' (quick)' if args.quick else ''))

    with stages.stage('data', f'shape data sets in {data_root}'):
        if args.skip_data:
            print('    skipped (--skip-data)')
        else:
            sizes = [f'--{key.replace("_", "-")}={value}'
                     for key, value in data_sizes(args.quick).items()]
            stages.run('tools/datasets/generate_shape_datasets.py', '--out', data_root, *sizes,
                       log_dir=work_dir)

    configs = {task.name: write_config(task, work_dir, data_root, args.quick, args.seed)
               for task in TASKS}
    checkpoints: Dict[str, str] = {}
    cls_task, det_task, seg_task = TASKS
    backbone_ckpt = work_dir / 'pretrain' / BACKBONE_CKPT
    for task, what in zip(TASKS, ('SAR-ResNet18 classifier on the ImageNet-style set',
                                  'finetune Faster R-CNN on the COCO-style set',
                                  'finetune DeepLabV3 on the VOC-style set')):
        with stages.stage(task.stage, what):
            stage_dir = work_dir / task.stage
            stages.run('tools/train.py', configs[task.name], '--work-dir', stage_dir,
                       *NO_VALIDATION, log_dir=stage_dir)
            checkpoints[task.name] = last_checkpoint(stage_dir)
            print(f'    checkpoint: {checkpoints[task.name]}')
        if task is cls_task:
            with stages.stage('convert', 'backbone-only checkpoint for finetuning'):
                # The demo owns its work dir (checked in parse_args): a re-run replaces it.
                stages.run('tools/model_converters/sar2backbone.py', checkpoints[task.name],
                           backbone_ckpt, '--overwrite', '--check-config',
                           configs[det_task.name], configs[seg_task.name],
                           log_dir=work_dir / 'pretrain')

    metrics: Dict[str, Dict[str, Dict[str, float]]] = {}
    with stages.stage('evaluate', 'trained vs untrained models on the held-out splits'):
        for task in TASKS:
            untrained = save_untrained(configs[task.name],
                                       work_dir / 'evaluate' / task.name / 'untrained.pth')
            metrics[task.name] = {}
            trained = checkpoints[task.name]
            for label, checkpoint in (('untrained', untrained), ('trained', trained)):
                out = work_dir / 'evaluate' / task.name / label
                stages.run('tools/test.py', configs[task.name], checkpoint, '--work-dir', out,
                           log_dir=out)
                metrics[task.name][label] = test_metrics(out)
            print(f'    {task.name}: {task.metric_name} '
                  f'{task.metric_scale * metrics[task.name]["untrained"][task.metric_key]:.1f} '
                  f'untrained -> '
                  f'{task.metric_scale * metrics[task.name]["trained"][task.metric_key]:.1f} '
                  f'trained, activation rate {metrics[task.name]["trained"]["act_rate"]:.2f}')

    rows = []
    with stages.stage('report', 'GMACs, mask overlays and the results table'):
        for task in TASKS:
            trained = metrics[task.name]['trained']
            flops_file = work_dir / 'report' / f'{task.name}_flops.json'
            stages.run('tools/analysis/get_flops.py', configs[task.name], '--shape',
                       *task.input_shape[1:], '--rate', '1.0', '--out', flops_file,
                       '--overwrite', log_dir=work_dir / 'report')
            flops = json.loads(flops_file.read_text())
            masks = work_dir / 'masks' / task.name
            stages.run('tools/analysis/visualize_masks.py', configs[task.name], '--checkpoint',
                       checkpoints[task.name], '--dataloader', '--num-images', args.num_vis,
                       '--out-dir', masks, '--overwrite', log_dir=work_dir / 'report')
            figures = json.loads((masks / 'masks.json').read_text())['images'].values()
            gmacs, dense = trained['effective_gflops'], flops['flops_dense'] / 1e9
            resnet = flops['reference']['flops'] / 1e9
            stage_rates = [v for k, v in sorted(trained.items())
                           if k.startswith('act_rate_stage')]
            cfg = Config.fromfile(str(configs[task.name]))
            rows.append(dict(
                task=task.name, model=task.model, input_shape=list(task.input_shape),
                metric_name=task.metric_name, metric_key=task.metric_key,
                untrained=task.metric_scale * metrics[task.name]['untrained'][task.metric_key],
                trained=task.metric_scale * trained[task.metric_key],
                act_rate=trained['act_rate'], stage_rates=stage_rates,
                target_rate=float(cfg.model.backbone.target_rate), gmacs=gmacs,
                gmacs_all_selected=dense, gmacs_resnet=resnet,
                saving_vs_all_selected=1 - gmacs / dense, saving_vs_resnet=1 - gmacs / resnet,
                params_m=flops['params'] / 1e6, metrics_untrained=metrics[task.name]['untrained'],
                metrics_trained=trained, mask_overlay=next(iter(figures))['figure'],
                config=str(task.config), resolved_config=str(configs[task.name]),
                checkpoint=checkpoints[task.name]))
            print(f'    masks:      {masks}')
        extra = dict(
            wall_seconds=stages.elapsed(), cpu_seconds=cpu_seconds() - cpu_start,
            stage_seconds=dict(stages.seconds), stage_cpu_seconds=dict(stages.cpu),
            quick=args.quick, seed=args.seed, backbone_checkpoint=str(backbone_ckpt),
            data_root=str(data_root), machine=machine_info())
        # The report stage itself is still running: count it in.
        extra['stage_seconds']['report'] = time.perf_counter() - stages.stage_start
        extra['stage_cpu_seconds']['report'] = cpu_seconds() - stages.stage_cpu
        markdown, json_path, table = write_report(work_dir, rows, extra)

    print('\n' + table)
    print(f'Results: {markdown} and {json_path}; mask overlays in {work_dir / "masks"}')
    print(f'Total: {_clock(stages.elapsed())} wall, {_clock(cpu_seconds() - cpu_start)} CPU')
    return json.loads(json_path.read_text())


if __name__ == '__main__':
    main()
