"""benchmarks/layout_copy.py on one repetition (no timing asserted)."""
import json

from ..script_loading import load_script


def test_both_copies_agree_and_the_pick_follows_the_thread_count(tmp_path):
    layout_copy = load_script('benchmarks/layout_copy.py')
    out = tmp_path / 'layout.json'
    report = layout_copy.main(['--threads', '1', '3', '--reps', '1', '--warmup', '0',
                               '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report)) and saved['meta']['code']
    assert len(saved['rows']) == 2 * len(layout_copy.SHAPES)
    for row in saved['rows']:
        assert row['agree'], row
        assert set(row['kernels']) == {'blocked', 'strided'}
        assert all(k['ms'] > 0 and k['gb_per_s'] > 0 for k in row['kernels'].values())
        blocked = row['direction'] == 'to NCHW' and row['threads'] == 1
        assert row['picked'] == ('blocked' if blocked else 'strided'), row
    markdown = (tmp_path / 'layout.md').read_text()
    assert 'blocked ms (GB/s)' in markdown and 'identical copies: yes' in markdown
