"""tools/demo_seeds.py: statistics over seeds, the same-seed repeat, reuse of finished runs."""
import json
import math

import pytest

from ..script_loading import load_script


def _results(seed, top1, det_rates, quick=False):
    rows = [dict(task='classification', metric_name='top-1 (%)', untrained=20.0, trained=top1,
                 act_rate=0.5, target_rate=0.5, stage_rates=[0.5, 0.5, 0.5]),
            dict(task='detection', metric_name='bbox mAP (%)', untrained=0.0, trained=40.0,
                 act_rate=sum(det_rates) / 3, target_rate=0.5, stage_rates=det_rates)]
    return dict(rows=rows, seed=seed, quick=quick, wall_seconds=60.0 * (seed + 1),
                machine=dict(cpu_model='test CPU', logical_cpus=2, torch='x', default_threads=2))


def test_mean_std_over_seeds_repeat_and_stages_outside_t():
    demo_seeds = load_script('tools/demo_seeds.py')
    runs = [dict(seed=0, again=False, results=_results(0, 80.0, [0.45, 0.5, 0.55])),
            dict(seed=1, again=False, results=_results(1, 84.0, [0.3, 0.5, 0.5])),
            dict(seed=0, again=True, results=_results(0, 81.0, [0.45, 0.5, 0.55]))]
    summary = demo_seeds.summarize(runs, tolerance=0.1)
    top1 = summary['tasks']['classification']['trained']
    assert top1['n'] == 2 and top1['mean'] == pytest.approx(82.0)
    assert top1['std'] == pytest.approx(math.sqrt(8.0))  # sample std of 80 and 84
    assert summary['repeat_max_diff']['classification']['trained'] == pytest.approx(1.0)
    assert summary['tasks']['detection']['worst_stage_gap']['mean'] == pytest.approx(0.125)
    # Only seed 1's detector stage 1 (0.30) is more than 0.1 from t = 0.5.
    assert [(o['seed'], o['task'], o['stage']) for o in summary['outside']] == \
        [(1, 'detection', 1)]
    for run in runs:
        run['wall_seconds'] = run['results']['wall_seconds']
    text = demo_seeds.markdown(summary, runs, 'python tools/demo_seeds.py', 300.0)
    assert '82.0 ± 2.8' in text and 'seed 1 detection stage 1: 0.300' in text
    assert 'seed 0 again 1.0 min' in text


def test_reuse_reads_only_a_finished_run_of_the_same_seed(tmp_path):
    demo_seeds = load_script('tools/demo_seeds.py')
    assert demo_seeds.reusable(tmp_path, 0, quick=False) is None
    (tmp_path / 'results.json').write_text(json.dumps(_results(3, 80.0, [0.5] * 3)))
    assert demo_seeds.reusable(tmp_path, 0, quick=False) is None  # another seed
    assert demo_seeds.reusable(tmp_path, 3, quick=True) is None  # a quick run is not a full one
    assert demo_seeds.reusable(tmp_path, 3, quick=False)['seed'] == 3
