"""benchmarks/train_step.py in --quick mode (tiny images, one repetition; no timing asserted)."""
import json
import math

import pytest

from ..script_loading import load_script


def test_quick_run_times_both_tasks_and_reports_ratios(tmp_path):
    train_step = load_script('benchmarks/train_step.py')
    out = tmp_path / 'train_step.json'
    report = train_step.main(['--quick', '--reps', '1', '--warmup', '0', '--threads', '1',
                              '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report)) and saved['meta']['quick'] is True
    assert saved['meta']['command'].startswith('python benchmarks/train_step.py --quick')
    assert [row['task'] for row in saved['rows']] == ['detection', 'segmentation']
    for row in saved['rows']:
        models = row['models']
        assert set(models) == {'resnet50', 'sar_r50'} and row['batch'] == 2
        assert all(math.isfinite(loss) and loss > 0 for loss in row['first_loss'].values())
        assert all(m['median_s'] > 0 and len(m['samples_s']) == 1 for m in models.values())
        assert row['ratio'] == pytest.approx(models['sar_r50']['median_s']
                                             / models['resnet50']['median_s'])
        assert row['configs']['sar_r50'].startswith('configs/')
    markdown = (tmp_path / 'train_step.md').read_text()
    assert '| detection | 128x160 |' in markdown and '| segmentation | 64x64 |' in markdown


def test_refuses_to_overwrite_a_report(tmp_path, capsys):
    train_step = load_script('benchmarks/train_step.py')
    out = tmp_path / 'train_step.json'
    out.write_text('{}')
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(['--quick', '--out', str(out)])
    assert exit_info.value.code == 2 and out.read_text() == '{}'
    assert 'overwrite' in capsys.readouterr().err
