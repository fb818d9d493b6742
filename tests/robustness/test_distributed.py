"""Two-process CPU (gloo) training through ``tools/dist_train.sh``.

A tiny Faster R-CNN and a tiny DeepLabV3 (the shipped configs with a narrow
SAR-ResNet18 and narrow heads, on generated COCO/VOC data) train for three
iterations on two processes. Checked, from what each rank records
(``tests/robustness/dist_probe.py``) and from the final checkpoint:

* the run finishes: DDP with ``find_unused_parameters=False`` raises at the
  second iteration if any trainable parameter got no gradient;
* the parameters are identical on both ranks and equal the checkpoint;
* every logged loss is finite;
* the logged activation rate is the sample-weighted mean of the two ranks'
  local rates (``SARRateSyncHook``), while the rate loss of each rank is
  Eq. 10 on its local batch (what DDP then averages);
* the two ranks seed their Gumbel noise differently (``SARNoiseSeedHook``).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from tests.robustness.dist_probe import parameter_hashes
from tools.datasets.generate_shape_datasets import CLASSES, generate_coco, generate_voc

REPO = Path(__file__).resolve().parents[2]
DIST_TRAIN = REPO / 'tools' / 'dist_train.sh'
FASTER_RCNN = REPO / 'configs' / 'faster_rcnn' / 'faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'
DEEPLABV3 = (REPO / 'configs' / 'deeplabv3' /
             'deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py')
NPROC = 2
BATCH = 2
ITERS = 3
NUM_TRAIN = NPROC * BATCH * ITERS
# A narrow SAR-ResNet18: stage widths 16/32/64/128.
NARROW = dict(depth=18, stem_channels=16, base_channels=16, init_cfg=None)
WIDTHS = [16, 32, 64, 128]


def test_rate_sync_weights_ranks_by_batch_size(monkeypatch):
    """The reduction itself, with another rank simulated: 2 images at rate 0.2 here,
    6 images at rate 0.6 there -> 0.5; losses and other keys are untouched."""
    from sar_backbones.engine import distributed_hooks
    from sar_backbones.engine.distributed_hooks import SARRateSyncHook

    outputs = dict(loss=torch.tensor(1.5), loss_act_rate=torch.tensor(0.3),
                   act_rate=torch.tensor(0.2), act_rate_stage1=torch.tensor(0.4),
                   acc=torch.tensor(9.))
    hook = SARRateSyncHook()
    # One process: nothing to do.
    hook.after_train_iter(None, 0, dict(inputs=[0, 0]), outputs)
    assert float(outputs['act_rate']) == pytest.approx(0.2)

    def other_rank_adds(tensor, op):  # keys in sorted order, then the sample count
        assert op == 'sum'
        tensor += torch.tensor([0.6 * 6, 0.8 * 6, 6.0])

    monkeypatch.setattr(distributed_hooks, 'get_world_size', lambda: 2)
    monkeypatch.setattr(distributed_hooks, 'all_reduce', other_rank_adds)
    hook.after_train_iter(None, 0, dict(inputs=[0, 0]), outputs)
    assert float(outputs['act_rate']) == pytest.approx(0.5)
    assert float(outputs['act_rate_stage1']) == pytest.approx((0.4 * 2 + 0.8 * 6) / 8)
    assert [float(outputs[k]) for k in ('loss', 'loss_act_rate', 'acc')] == \
        pytest.approx([1.5, 0.3, 9.])
    with pytest.raises(ValueError, match='prefixes'):
        SARRateSyncHook(prefixes=())


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('dist_data')
    generate_coco(root, num_train=NUM_TRAIN, num_val=1, image_size=(64, 96))
    generate_voc(root, num_train=NUM_TRAIN, num_val=1, image_size=(64, 96))
    return root


def _scaled(pipeline, scale, crop=None):
    for step in pipeline:
        if step['type'] in ('Resize', 'RandomResize'):
            step['scale'] = scale
        if crop is not None and step['type'] == 'RandomCrop':
            step['crop_size'] = crop
        if crop is not None and step['type'] == 'Pad':
            step['size'] = crop
    return pipeline


def _finish(cfg, probe_dir):
    """Train only (no val/test), log every iteration, add the rate-sync and probe hooks."""
    cfg.train_dataloader.update(batch_size=BATCH, num_workers=0, persistent_workers=False)
    for split in ('val', 'test'):
        cfg[f'{split}_dataloader'] = None
        cfg[f'{split}_cfg'] = None
        cfg[f'{split}_evaluator'] = None
    cfg.default_hooks.logger.interval = 1
    cfg.randomness = dict(seed=0)
    cfg.find_unused_parameters = False
    cfg.custom_imports = dict(imports=['sar_backbones', 'tests.robustness.dist_probe'],
                              allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.custom_hooks) + [
        dict(type='sar_backbones.SARRateSyncHook'),
        dict(type='SARRobustnessDistProbe', out_dir=str(probe_dir)),
    ]
    return cfg


def tiny_faster_rcnn(data_root, probe_dir):
    cfg = Config.fromfile(str(FASTER_RCNN))
    model = cfg.model
    model.backbone.update(NARROW)
    model.neck.update(in_channels=WIDTHS, out_channels=32)
    model.rpn_head.update(in_channels=32, feat_channels=32)
    model.roi_head.bbox_roi_extractor.out_channels = 32
    model.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=len(CLASSES))
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=64)
    model.train_cfg.rcnn.sampler.num = 32
    coco = Path(data_root) / 'coco'
    dataset = cfg.train_dataloader.dataset
    dataset.update(data_root=str(coco), ann_file='annotations/instances_train2017.json',
                   data_prefix=dict(img='train2017/'), metainfo=dict(classes=CLASSES),
                   pipeline=_scaled(dataset.pipeline, (128, 96)))
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
    return _finish(cfg, probe_dir)


def tiny_deeplabv3(data_root, probe_dir):
    cfg = Config.fromfile(str(DEEPLABV3))
    model = cfg.model
    model.backbone.update(NARROW)  # keeps OS8, the deep stem and SyncBN (swapped on CPU)
    model.decode_head.update(in_channels=WIDTHS[3], channels=32)
    model.auxiliary_head.update(in_channels=WIDTHS[2], channels=16)
    model.data_preprocessor.size = (64, 64)
    voc = Path(data_root) / 'VOCdevkit' / 'VOC2012'
    cfg.train_dataloader.dataset = dict(
        type='PascalVOCDataset', data_root=str(voc),
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/train.txt',
        pipeline=_scaled(cfg.train_pipeline, (128, 96), crop=(64, 64)))
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=ITERS)
    cfg.param_scheduler[0].end = ITERS
    cfg.default_hooks.checkpoint.interval = ITERS
    return _finish(cfg, probe_dir)


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _run_dist_train(cfg, tmp_path):
    config_path = tmp_path / 'config.py'
    cfg.dump(str(config_path))
    work_dir = tmp_path / 'work_dir'
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), OMP_NUM_THREADS='1')
    result = subprocess.run(['bash', str(DIST_TRAIN), str(config_path), str(NPROC),
                             '--work-dir', str(work_dir)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # DDP's complaint about parameters without gradient (fatal with find_unused_parameters=False).
    assert 'Expected to have finished reduction' not in output
    return work_dir, output


@pytest.mark.parametrize('task', ['faster_rcnn', 'deeplabv3'])
def test_two_process_cpu_training(task, data_root, tmp_path):
    probe_dir = tmp_path / 'probe'
    probe_dir.mkdir()
    build = tiny_faster_rcnn if task == 'faster_rcnn' else tiny_deeplabv3
    work_dir, output = _run_dist_train(build(data_root, probe_dir), tmp_path)
    assert 'gloo' in output  # tools/train.py switched NCCL -> gloo for the CPU

    ranks = [json.loads((probe_dir / f'rank{r}.json').read_text()) for r in range(NPROC)]
    assert [r['rank'] for r in ranks] == list(range(NPROC))
    assert all(r['world_size'] == NPROC for r in ranks)
    assert all(r['wrapper'] == 'MMDistributedDataParallel' for r in ranks)

    # Identical parameters on both ranks, equal to the saved checkpoint.
    assert ranks[0]['params_sha256'] == ranks[1]['params_sha256']
    assert ranks[0]['param_hashes'] == ranks[1]['param_hashes']
    checkpoint_name = (work_dir / 'last_checkpoint').read_text().strip()
    checkpoint = torch.load(checkpoint_name, map_location='cpu', weights_only=False)
    names = set(ranks[0]['param_hashes'])
    saved, _ = parameter_hashes((k, v) for k, v in checkpoint['state_dict'].items() if k in names)
    assert saved == ranks[0]['param_hashes']
    assert any('selectors' in name for name in names)

    records = [r['records'] for r in ranks]
    assert [len(rec) for rec in records] == [ITERS] * NPROC
    differs = False
    for step in range(ITERS):
        per_rank = [rec[step] for rec in records]
        assert len({p['iter'] for p in per_rank}) == 1
        for p in per_rank:
            # Finite losses, and the rate loss of each rank is Eq. 10 on its own batch.
            assert p['all_finite'], p['outputs']
            assert 'loss_act_rate' in p['outputs'] and 'loss' in p['outputs']
            assert p['outputs']['loss_act_rate'] == pytest.approx(p['local_eq10'], rel=1e-5,
                                                                  abs=1e-7)
        # Logged rate = sample-weighted mean of the local rates, the same on every rank.
        total = sum(p['batch'] for p in per_rank)
        mean = sum(p['local_act_rate'] * p['batch'] for p in per_rank) / total
        for p in per_rank:
            assert p['outputs']['act_rate'] == pytest.approx(mean, rel=1e-6, abs=1e-7)
            assert p['hub_act_rate'] == pytest.approx(mean, rel=1e-6, abs=1e-7)
        differs |= abs(per_rank[0]['local_act_rate'] - per_rank[1]['local_act_rate']) > 1e-3
    assert differs, 'the ranks saw the same rates: the averaging was not exercised'

    # SARNoiseSeedHook (from the shipped configs' custom hooks, diff_rank_seed off):
    # the Gumbel noise of every iteration is seeded from (seed, rank, iteration), so the
    # two ranks draw different noise, and a resumed rank would draw the same again.
    from sar_backbones.engine import SARNoiseSeedHook
    seeds = [r['noise_seeds'] for r in ranks]
    assert [len(s) for s in seeds] == [ITERS] * NPROC
    runner_seed = seeds[0][0]['runner_seed']
    assert {s['runner_seed'] for per_rank in seeds for s in per_rank} == {runner_seed}
    for rank, per_rank in enumerate(seeds):
        for step in per_rank:
            assert step['seed'] == SARNoiseSeedHook.iteration_seed(runner_seed, step['iter'],
                                                                   rank=rank)
    assert len({s['seed'] for per_rank in seeds for s in per_rank}) == ITERS * NPROC
    for p in (rec[-1] for rec in records):
        assert 0 < p['local_act_rate'] < 1
