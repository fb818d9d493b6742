"""``tools/analysis/benchmark_latency.py --arch``: SAR-ResNeXt / SAR-MobileNetV2 vs their plain
counterparts on a tiny input with one repetition (no timing asserted)."""
import json

import pytest

from ..script_loading import load_script


@pytest.mark.parametrize('arch,sar,plain', [
    ('resnext50-32x4d', 'SARResNeXt', 'mmdet ResNeXt-50 32x4d'),
    ('mobilenet-v2', 'SARMobileNetV2', 'mmpretrain MobileNetV2'),
])
def test_arch_benchmark_times_sparse_dense_and_plain(arch, sar, plain, tmp_path):
    tool = load_script('tools/analysis/benchmark_latency.py')
    out = tmp_path / 'latency.json'
    report = tool.main(['--arch', arch, '--sizes', '64x96', '--threads', '1', '--rates', '0.5',
                        '1.0', '--reps', '1', '--warmup', '0', '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    meta = saved['meta']
    assert meta['arch'] == arch and meta['sar'] == sar and meta['plain'].startswith(plain)
    assert meta['command'].startswith(f'python tools/analysis/benchmark_latency.py --arch {arch}')
    assert 'commit' in meta['code'] and meta['cpu_model']
    rows = {row['case']: row for row in saved['rows']}
    assert list(rows) == ['plain', 'sar-dense@0.50', 'sar-sparse@0.50', 'sar-dense@1.00',
                          'sar-sparse@1.00']
    assert rows['plain']['ratio_vs_plain'] == 1.0
    for name in ('sar-sparse@0.50', 'sar-sparse@1.00'):
        row = rows[name]
        assert row['speedup_vs_dense'] == pytest.approx(
            rows[name.replace('sparse', 'dense')]['median_ms'] / row['median_ms'])
        assert row['ratio_vs_plain'] == pytest.approx(
            row['median_ms'] / rows['plain']['median_ms'])
    check, = saved['checks']
    assert check['max_rel_error'] < 1e-4  # the sparse path computes the dense function
    assert 0 < check['actual_rate'] < 1  # partial masks: a real check
    markdown = (tmp_path / 'latency.md').read_text()
    assert f'SAR {arch} vs its plain counterpart' in markdown and '| sar-sparse@0.50 |' in markdown


def test_arch_refuses_resnet_only_options(tmp_path, capsys):
    tool = load_script('tools/analysis/benchmark_latency.py')
    with pytest.raises(SystemExit) as exit_info:
        tool.main(['--arch', 'mobilenet-v2', '--compile', '--out', str(tmp_path / 'x.json')])
    assert exit_info.value.code == 2
    assert 'argument --compile: only with --arch resnet' in capsys.readouterr().err
