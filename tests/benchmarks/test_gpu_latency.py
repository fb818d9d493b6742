"""benchmarks/gpu_latency.py: a quick run where a GPU is, its one-line refusal elsewhere."""
import json

import pytest
import torch

from ..script_loading import load_script


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a CUDA device')
def test_without_a_gpu_it_exits_with_one_line(tmp_path, capsys):
    gpu_latency = load_script('benchmarks/gpu_latency.py')
    out = tmp_path / 'gpu.json'
    with pytest.raises(SystemExit) as exit_info:
        gpu_latency.main(['--out', str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and 'no CUDA device' in error
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_quick_run_on_the_gpu(tmp_path):
    gpu_latency = load_script('benchmarks/gpu_latency.py')
    out = tmp_path / 'gpu.json'
    report = gpu_latency.main(['--sizes', '224x224', '--rates', '0.5', '--reps', '2',
                               '--warmup', '1', '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert all(check['max_rel_error'] < 1e-4 for check in saved['meta']['checks'])
    cases = {(row['case'], row['dtype']) for row in saved['rows']}
    assert ('sar50-sparse@0.50', 'fp16') in cases and ('resnet50', 'fp32') in cases
