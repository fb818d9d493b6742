"""The demo over several seeds: mean +- std of every number of its table.

``make demo`` runs :mod:`tools/demo.py` once, with one seed. Short CPU
schedules and float rounding (which differs between CPUs and thread counts)
move its numbers from run to run, so one run says little about the spread.
This command runs the whole demo (pretrain, finetune, evaluate) once per
seed, plus the first seed a second time (how much the same seed moves on
this machine), and writes the table with ``mean +- std`` over the seeds,
including the per-stage inference activation rates and how far the worst
stage is from the target rate ``t``::

    python tools/demo_seeds.py --work-dir work_dirs/demo_seeds --seeds 0 1 2

Output in ``--work-dir``: one demo work dir per run (``seed<N>``,
``seed<N>_again``), one generated data set shared by all runs (``data``),
``seeds.md`` (the table, the command, the machine and the wall time) and
``seeds.json`` (every run's numbers and the statistics).
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sar_backbones.utils.cli import ArgumentParser, float_in, non_negative_int  # noqa: E402

DEMO = REPO / 'tools' / 'demo.py'
# Numbers of a results.json row that get mean +- std (percentages where noted).
NUMBERS = (('untrained', 'Untrained', '{:.1f}'), ('trained', 'Trained', '{:.1f}'),
           ('act_rate', 'Act. rate', '{:.3f}'), ('gmacs', 'Backbone GMACs', '{:.3f}'),
           ('gmacs_all_selected', 'All selected', '{:.3f}'),
           ('gmacs_resnet', 'Plain ResNet', '{:.3f}'),
           ('saving_vs_resnet', 'Saving vs ResNet (%)', '{:.1f}'))
PERCENT = ('saving_vs_resnet', )


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    var = (sum((v - mean)**2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.
    return dict(mean=mean, std=math.sqrt(var), n=len(values))


def row_numbers(row: dict) -> Dict[str, float]:
    """The numbers of one task's row of a demo ``results.json`` (stage rates spread out)."""
    numbers = {key: float(row[key]) * (100. if key in PERCENT else 1.)
               for key, _, _ in NUMBERS if key in row}
    for index, rate in enumerate(row.get('stage_rates', []), start=1):
        numbers[f'stage{index}_rate'] = float(rate)
    if row.get('stage_rates'):
        numbers['worst_stage_gap'] = max(abs(float(r) - float(row['target_rate']))
                                         for r in row['stage_rates'])
    return numbers


def summarize(runs: List[dict], tolerance: float) -> dict:
    """Statistics over the seeds, and the same-seed repeat's largest difference.

    Args:
        runs (list[dict]): ``dict(seed=..., again=bool, results=<results.json>)``.
        tolerance (float): Allowed distance of a stage's inference rate from ``t``.

    Returns:
        dict: ``tasks`` -> per number ``{mean, std, n}`` over the distinct
        seeds, ``repeat_max_diff`` per task and number, and ``outside``: the
        (seed, task, stage, rate) whose rate misses ``t`` by more than
        ``tolerance``.
    """
    per_task: Dict[str, Dict[str, List[float]]] = {}
    first: Dict[int, Dict[str, Dict[str, float]]] = {}
    repeat: Dict[str, Dict[str, float]] = {}
    outside = []
    for run in runs:
        for row in run['results']['rows']:
            numbers = row_numbers(row)
            for index, rate in enumerate(row.get('stage_rates', []), start=1):
                if abs(float(rate) - float(row['target_rate'])) > tolerance:
                    outside.append(dict(seed=run['seed'], again=run['again'], task=row['task'],
                                        stage=index, rate=float(rate),
                                        target=float(row['target_rate'])))
            if run['again']:
                twin = first[run['seed']][row['task']]
                repeat[row['task']] = {k: abs(v - twin[k]) for k, v in numbers.items()
                                       if k in twin}
                continue
            first.setdefault(run['seed'], {})[row['task']] = numbers
            task = per_task.setdefault(row['task'], {})
            for key, value in numbers.items():
                task.setdefault(key, []).append(value)
    tasks = {name: {key: mean_std(values) for key, values in numbers.items()}
             for name, numbers in per_task.items()}
    return dict(tasks=tasks, repeat_max_diff=repeat, outside=outside, tolerance=tolerance)


def _cell(stat: Optional[dict], fmt: str) -> str:
    if stat is None:
        return '-'
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def markdown(summary: dict, runs: List[dict], command: str, wall: float) -> str:
    """``seeds.md``: the table over seeds, per-stage rates, the repeat and the machine."""
    seeds = sorted({run['seed'] for run in runs if not run['again']})
    rows0 = {row['task']: row for row in runs[0]['results']['rows']}
    head = ['Task', 'Metric'] + [title for _, title, _ in NUMBERS]
    lines = [f'Over seeds {", ".join(map(str, seeds))} (mean ± sample std, n = {len(seeds)}):',
             '', '| ' + ' | '.join(head) + ' |', '|' + '|'.join(' --- ' for _ in head) + '|']
    for task, stats in summary['tasks'].items():
        cells = [task, rows0[task]['metric_name']] + [
            _cell(stats.get(key), fmt) for key, _, fmt in NUMBERS]
        lines.append('| ' + ' | '.join(cells) + ' |')
    stage_keys = sorted({k for stats in summary['tasks'].values() for k in stats
                         if k.startswith('stage')})
    head = ['Task', 'Target t'] + [f'Stage {k[5:-5]} rate' for k in stage_keys] + \
        ['Worst stage gap to t', 'Same seed twice: differences']
    lines += ['', 'Inference (deterministic) activation rate per SAR stage on the held-out '
              'split:', '', '| ' + ' | '.join(head) + ' |',
              '|' + '|'.join(' --- ' for _ in head) + '|']
    for task, stats in summary['tasks'].items():
        diff = summary['repeat_max_diff'].get(task)
        worst_diff = '-' if not diff else ', '.join(
            f'{key} {value:.3g}' for key, value in diff.items() if value > 0) or 'none (identical)'
        cells = [task, f"{rows0[task]['target_rate']:.2f}"] + [
            _cell(stats.get(k), '{:.3f}') for k in stage_keys] + [
            _cell(stats.get('worst_stage_gap'), '{:.3f}'), worst_diff]
        lines.append('| ' + ' | '.join(cells) + ' |')
    outside = summary['outside']
    lines += ['', (f"Every stage of every run within {summary['tolerance']:g} of t."
                   if not outside else
                   f"Stages more than {summary['tolerance']:g} from t: " + '; '.join(
                       f"seed {o['seed']}{' (again)' if o['again'] else ''} {o['task']} "
                       f"stage {o['stage']}: {o['rate']:.3f}" for o in outside))]
    machine = runs[0]['results'].get('machine', {})
    lines += ['', f'Command: `{command}`', '',
              f"Machine: {machine.get('cpu_model', platform.processor() or 'unknown')}, "
              f"{machine.get('logical_cpus', os.cpu_count())} logical CPUs, torch "
              f"{machine.get('torch', '?')}, {machine.get('default_threads', '?')} threads. "
              'Wall time per demo run: ' + ', '.join(
                  f"seed {run['seed']}{' again' if run['again'] else ''} "
                  f"{run['wall_seconds'] / 60:.1f} min" for run in runs) +
              f'; this command {wall / 60:.1f} min'
              f"{' (earlier runs reused)' if any(r.get('reused') for r in runs) else ''}.", '']
    return '\n'.join(lines)


def reusable(run_dir: Path, seed: int, quick: bool) -> Optional[dict]:
    """The ``results.json`` of a finished demo run of ``seed`` in ``run_dir`` (None if absent)."""
    path = run_dir / 'results.json'
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    if results.get('seed') != seed or bool(results.get('quick')) != quick:
        return None
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description='Run tools/demo.py over several seeds and write '
                            'mean ± std of its table (and per-stage inference rates)')
    parser.add_argument('--work-dir', default='work_dirs/demo_seeds',
                        help='where every run writes (default: work_dirs/demo_seeds)')
    parser.add_argument('--seeds', type=non_negative_int, nargs='+', default=[0, 1, 2],
                        help='seeds to run (default: 0 1 2)')
    parser.add_argument('--no-repeat', action='store_true',
                        help='do not run the first seed a second time')
    parser.add_argument('--tolerance', type=float_in(0.0, 1.0), default=0.1,
                        help='allowed |stage rate - t| reported as met (default: 0.1)')
    parser.add_argument('--quick', action='store_true',
                        help='pass --quick to tools/demo.py (tiny data, a few iterations)')
    parser.add_argument('--overwrite', action='store_true',
                        help='run again into a --work-dir that holds earlier runs')
    parser.add_argument('--reuse', action='store_true',
                        help='read a run whose results.json (same seed, same --quick) is '
                        'already in --work-dir instead of running it again (with --overwrite)')
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f'argument --seeds: each seed once, got {args.seeds}')
    work_dir = Path(args.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        parser.error(f'argument --work-dir: {work_dir} is not a directory')
    if work_dir.is_dir() and any(work_dir.iterdir()) and not args.overwrite:
        parser.error(f'argument --work-dir: {work_dir} is not empty; pass --overwrite')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    work_dir = Path(args.work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_root = work_dir / 'data'
    plan = [(seed, False) for seed in args.seeds]
    if not args.no_repeat:
        plan.append((args.seeds[0], True))
    command = 'python tools/demo_seeds.py ' + ' '.join(
        sys.argv[1:] if argv is None else list(argv))
    start = time.perf_counter()
    runs = []
    for index, (seed, again) in enumerate(plan):
        run_dir = work_dir / (f'seed{seed}' + ('_again' if again else ''))
        cmd = [sys.executable, str(DEMO), '--work-dir', str(run_dir), '--seed', str(seed),
               '--data-root', str(data_root), '--overwrite']
        if index > 0:  # one data set for all runs: the seeds vary training only
            cmd.append('--skip-data')
        if args.quick:
            cmd.append('--quick')
        finished = reusable(run_dir, seed, args.quick) if args.reuse else None
        if finished is not None:
            print(f'[{index + 1}/{len(plan)}] reused {run_dir / "results.json"}', flush=True)
            runs.append(dict(seed=seed, again=again, work_dir=str(run_dir), results=finished,
                             wall_seconds=float(finished.get('wall_seconds', 0.0)), reused=True))
            continue
        print(f'[{index + 1}/{len(plan)}] ' + ' '.join(cmd), flush=True)
        run_start = time.perf_counter()
        subprocess.run(cmd, check=True)
        results = json.loads((run_dir / 'results.json').read_text())
        runs.append(dict(seed=seed, again=again, work_dir=str(run_dir), results=results,
                         wall_seconds=time.perf_counter() - run_start))
    wall = time.perf_counter() - start
    summary = summarize(runs, args.tolerance)
    text = markdown(summary, runs, command, wall)
    (work_dir / 'seeds.md').write_text('# SAR-ResNet demo over seeds\n\n' + text)
    report = dict(command=command, wall_seconds=wall, summary=summary,
                  runs=[{k: v for k, v in run.items()} for run in runs])
    (work_dir / 'seeds.json').write_text(json.dumps(report, indent=1) + '\n')
    print('\n' + text)
    print(f'Written: {work_dir / "seeds.md"} and {work_dir / "seeds.json"}')
    return report


if __name__ == '__main__':
    main()
