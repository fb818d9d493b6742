"""benchmarks/detector_latency.py on a tiny image with one repetition (no timing asserted)."""
import json
import math

import pytest

from ..script_loading import load_script


def test_quick_run_times_both_detectors_and_reports_ratios(tmp_path):
    detector_latency = load_script('benchmarks/detector_latency.py')
    out = tmp_path / 'detector.json'
    report = detector_latency.main(['--quick', '--reps', '1', '--warmup', '0', '--threads', '1',
                                    '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report)) and saved['meta']['quick'] is True
    meta = saved['meta']
    assert meta['command'].startswith('python benchmarks/detector_latency.py --quick')
    assert 'commit' in meta['code'] and meta['cpu_model'] and meta['rate'] == 0.5
    rows = {row['model']: row for row in saved['rows']}
    assert list(rows) == ['resnet50', 'sar_r50']
    assert rows['sar_r50']['config'] == \
        'configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'
    assert rows['resnet50']['config'] == 'faster-rcnn_r50_fpn_1x_coco.py'
    # set_mask_override(0.5): the SAR backbone refines half of the patches, whatever its weights
    assert rows['sar_r50']['activation_rate'] == pytest.approx(0.5, abs=0.05)
    assert rows['resnet50']['activation_rate'] is None
    for row in rows.values():
        assert row['size'] == [128, 160] and row['batch'] == 1
        assert len(row['samples_ms']) == 1 and math.isfinite(row['median_ms'])
        assert row['median_ms'] > 0 and row['detections'] >= 0
    assert rows['sar_r50']['ratio_to_resnet50'] == pytest.approx(
        rows['sar_r50']['median_ms'] / rows['resnet50']['median_ms'])
    markdown = (tmp_path / 'detector.md').read_text()
    assert '| sar_r50 | configs/faster_rcnn/' in markdown and '128x160' in markdown


def test_deployed_sar_detector_is_sparse_and_folded():
    """The SAR side is what the report says: deployed (no BatchNorm left), sparse, rate fixed."""
    from torch.nn.modules.batchnorm import _BatchNorm
    detector_latency = load_script('benchmarks/detector_latency.py')
    model, config = detector_latency.build_detector('sar_r50', 0.3)
    backbone = model.backbone
    assert backbone.deployed and not model.training
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert config.endswith('faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py')
    model.test_step(detector_latency.detection_input((96, 128)))
    # random patches at rate 0.3, rounded to whole patches of the small grids of this image
    assert float(backbone.get_activation_rates().mean()) == pytest.approx(0.3, abs=0.15)
