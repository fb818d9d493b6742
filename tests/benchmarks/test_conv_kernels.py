"""benchmarks/conv_kernels.py on one repetition (no timing asserted)."""
import json

from ..script_loading import load_script


def test_every_kernel_computes_the_same_convolution(tmp_path):
    conv_kernels = load_script('benchmarks/conv_kernels.py')
    out = tmp_path / 'kernels.json'
    report = conv_kernels.main(['--reps', '1', '--warmup', '0', '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved['meta']['threads'] == 1 and saved['meta']['code']
    assert len(saved['rows']) == len(conv_kernels.SHAPES)
    for row in saved['rows']:
        kernels = row['kernels']
        # the BLAS product exists for 1x1 convs only; oneDNN runs every shape
        expected = {'default', 'onednn', 'onednn-prepacked'}
        if row['kernel'] == 1:
            expected.add('addmm')
        assert set(kernels) == expected, row['shape']
        for result in kernels.values():
            assert result['max_abs_diff_vs_default'] < 1e-4  # outputs are ~N(0, 1)
            assert result['ms'] > 0 and result['gmacs_per_s'] > 0
    markdown = (tmp_path / 'kernels.md').read_text()
    assert 'onednn-prepacked ms (GMAC/s)' in markdown and 'refine s1 conv1 rows' in markdown
