"""The main job (``tools/demo.py``) end to end, in its reduced ``--quick`` form.

One run (tiny generated data sets, a couple of iterations per stage) is shared
by the tests below, which check what every stage left in the work dir: the
checkpoints, the converted backbone (and that it really is what the detector
and the segmenter start from), the metrics of the trained and the untrained
models, and the results table.
"""
import json
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from PIL import Image

from ..script_loading import load_script

TASKS = ('classification', 'detection', 'segmentation')
METRIC_KEYS = dict(classification='accuracy/top1', detection='coco/bbox_mAP',
                   segmentation='mIoU')
ROW_FIELDS = ('task', 'model', 'input_shape', 'metric_name', 'untrained', 'trained',
              'act_rate', 'stage_rates', 'target_rate', 'gmacs', 'gmacs_all_selected',
              'gmacs_resnet', 'saving_vs_all_selected', 'saving_vs_resnet', 'params_m',
              'checkpoint', 'resolved_config', 'mask_overlay')


@pytest.fixture(scope='module')
def demo():
    return load_script('tools/demo.py')


@pytest.fixture(scope='module')
def quick_run(demo, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('demo')
    results = demo.main(['--work-dir', str(work_dir), '--quick', '--num-vis', '2', '--seed', '3'])
    return work_dir, results


def _rows(results):
    return {row['task']: row for row in results['rows']}


def _backbone_from(resolved_config: str, checkpoint: str):
    """The backbone of a resolved stage config, initialised from ``checkpoint``."""
    from mmengine.registry import MODELS, init_default_scope

    cfg = Config.fromfile(resolved_config)
    init_default_scope(cfg.default_scope)
    backbone_cfg = cfg.model.backbone.copy()
    assert backbone_cfg.init_cfg.checkpoint == checkpoint
    backbone = MODELS.build(backbone_cfg)
    backbone.init_weights()
    return backbone


def test_every_stage_ran_and_left_its_outputs(quick_run, demo):
    work_dir, results = quick_run
    assert set(results['stage_seconds']) == set(demo.STAGES)
    rows = _rows(results)
    assert set(rows) == set(TASKS)
    for task, stage in zip(TASKS, ('pretrain', 'detection', 'segmentation')):
        row = rows[task]
        checkpoint = Path(row['checkpoint'])
        assert checkpoint.parent == work_dir / stage and checkpoint.is_file()
        state = torch.load(checkpoint, map_location='cpu', weights_only=False)
        assert any(key.startswith('backbone.') for key in state['state_dict'])
        # The resolved config reproduces the stage with tools/train.py.
        cfg = Config.fromfile(row['resolved_config'])
        assert 'sar_backbones' in cfg.custom_imports.imports
        assert cfg.randomness.seed == 3 == results['seed']
        assert str(work_dir / 'data') in json.dumps(cfg.train_dataloader.to_dict())
        # Trained and untrained models were both evaluated with the task metric,
        # and each test run left its log.
        for label in ('trained', 'untrained'):
            metrics = row[f'metrics_{label}']
            assert METRIC_KEYS[task] in metrics and 'act_rate' in metrics
            assert list((work_dir / 'evaluate' / task / label).rglob('*.log'))
    assert Path(rows['detection']['checkpoint']).name == 'epoch_1.pth'
    assert Path(rows['segmentation']['checkpoint']).name == 'iter_2.pth'


def test_converted_backbone_feeds_detector_and_segmenter(quick_run):
    work_dir, results = quick_run
    path = Path(results['backbone_checkpoint'])
    assert path.parent == work_dir / 'pretrain'
    # Backbone-only and loadable without unpickling arbitrary objects.
    converted = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    pretrain = torch.load(_rows(results)['classification']['checkpoint'], map_location='cpu',
                          weights_only=False)['state_dict']
    assert converted.keys() == {k[len('backbone.'):] for k in pretrain if
                                k.startswith('backbone.')}
    for key, value in converted.items():
        assert torch.equal(value, pretrain[f'backbone.{key}'])
    rows = _rows(results)
    for task in ('detection', 'segmentation'):
        backbone = _backbone_from(rows[task]['resolved_config'], str(path))
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, converted[key]), (task, key)
    # The detector really started from it: its stem and stage 1 are frozen
    # (frozen_stages=1), so they still hold the pretrained weights.
    detector = torch.load(rows['detection']['checkpoint'], map_location='cpu',
                          weights_only=False)['state_dict']
    assert torch.equal(detector['backbone.conv1.weight'], converted['conv1.weight'])
    stage1 = [k for k in converted if k.startswith('layer1.') and k.endswith('weight')]
    assert stage1 and all(torch.equal(detector[f'backbone.{k}'], converted[k]) for k in stage1)


def test_results_table_is_complete(quick_run):
    work_dir, results = quick_run
    rows = _rows(results)
    for task, row in rows.items():
        assert all(field in row for field in ROW_FIELDS), task
        assert 0.0 <= row['act_rate'] <= 1.0
        assert len(row['stage_rates']) == 3 and all(0.0 <= r <= 1.0 for r in row['stage_rates'])
        assert row['target_rate'] == pytest.approx(0.5)
        assert 0.0 <= row['untrained'] <= 100.0 and 0.0 <= row['trained'] <= 100.0
        # Effective cost never exceeds the all-selected cost, and the plain
        # ResNet18 trunk costs more than either (the base branches are cheap).
        assert 0 < row['gmacs'] <= row['gmacs_all_selected'] + 1e-9
        assert row['gmacs_all_selected'] < row['gmacs_resnet']
        assert row['saving_vs_resnet'] == pytest.approx(1 - row['gmacs'] / row['gmacs_resnet'])
        image = Image.open(row['mask_overlay'])
        assert image.size[0] > 100 and image.size[1] > 100
    # Same input size, same backbone: classification at 64x64 costs less.
    assert rows['classification']['gmacs_resnet'] < rows['detection']['gmacs_resnet']
    table = (work_dir / 'results.md').read_text()
    for text in ('top-1', 'bbox mAP', 'mIoU', 'Act. rate', 'Plain ResNet', 'Wall time'):
        assert text in table
    assert json.loads((work_dir / 'results.json').read_text()) == results
