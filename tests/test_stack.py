"""Checks that the pinned OpenMMLab stack works on this machine's PyTorch.

These tests guard the foundation every other part of the project stands on:

* mmcv's compiled CPU ops compute the right numbers (hand-derived references,
  plus torchvision's independent implementations);
* the wheels' own Faster R-CNN, DeepLab-v3 and ResNet-50 classifier configs
  load through ``pkg::`` ``_base_`` inheritance (as the project's configs do),
  build and run, with outputs cross-checked between their predict and loss
  paths;
* a checkpoint written by mmengine's ``Runner`` resumes under torch >= 2.6
  with weights-only unpickling, which only works because of
  ``sar_backbones.compat`` (it allows exactly what such checkpoints hold, and
  nothing that could run code).
"""
import copy
import math
import pickle
import uuid
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
import torchvision
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.structures import InstanceData, PixelData
from torch import nn
from torch.utils.data import Dataset

import sar_backbones  # noqa: F401  (applies sar_backbones.compat)

# --------------------------------------------------------------------------
# (a) mmcv.ops against references
# --------------------------------------------------------------------------


def test_mmcv_nms_hand_computed() -> None:
    """Greedy NMS on boxes whose IoUs are worked out by hand.

    IoU(A, B) = 81 / 119 = 0.681 (9x9 overlap of two 10x10 boxes);
    IoU(C, D) = 95 / 105 = 0.905 (9.5x10 overlap); E overlaps nothing.
    Score order: D, A, B, C, E.
    """
    from mmcv.ops import nms

    boxes = torch.tensor([
        [0., 0., 10., 10.],  # A
        [1., 1., 11., 11.],  # B
        [0., 20., 10., 30.],  # C
        [.5, 20., 10.5, 30.],  # D
        [50., 50., 60., 60.],  # E
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.3])
    expected = {
        0.5: [3, 0, 4],  # B suppressed by A, C by D
        0.7: [3, 0, 1, 4],  # 0.681 < 0.7 keeps B; 0.905 still drops C
        0.95: [3, 0, 1, 2, 4],  # nothing overlaps that much
    }
    for iou_thr, keep_ref in expected.items():
        dets, keep = nms(boxes, scores, iou_thr)
        assert keep.tolist() == keep_ref, iou_thr
        assert torch.equal(dets[:, :4], boxes[keep_ref])
        assert torch.equal(dets[:, 4], scores[keep_ref])


def test_mmcv_nms_matches_torchvision() -> None:
    from mmcv.ops import nms

    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=gen) * 100
    wh = torch.rand(300, 2, generator=gen) * 30 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(300, generator=gen)
    for iou_thr in (0.3, 0.5, 0.7):
        _, keep = nms(boxes, scores, iou_thr)
        keep_ref = torchvision.ops.nms(boxes, scores, iou_thr)
        assert keep.tolist() == keep_ref.tolist()


def _ramp_features(height: int, width: int) -> tuple:
    """Two images x two channels of ``slope_x * x + slope_y * y + offset``.

    Bilinear interpolation reproduces a linear function exactly, and the mean
    of samples placed symmetrically in a bin is the value at the bin centre,
    so RoIAlign's average pooling must return the ramp at each bin centre.
    """
    slope_x = torch.tensor([[1.0, -0.5], [2.0, 0.25]])
    slope_y = torch.tensor([[0.5, 3.0], [-1.0, 1.5]])
    offset = torch.tensor([[0.0, 10.0], [-5.0, 2.0]])
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing='ij')
    feats = (slope_x[..., None, None] * xs + slope_y[..., None, None] * ys +
             offset[..., None, None])
    return feats, slope_x, slope_y, offset


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_mmcv_roi_align_linear_ramp(aligned: bool,
                                    sampling_ratio: int) -> None:
    from mmcv.ops import RoIAlign

    spatial_scale, out_h, out_w = 0.5, 3, 4
    feats, slope_x, slope_y, offset = _ramp_features(16, 20)
    # (batch index, x1, y1, x2, y2) in input-image pixels; kept away from the
    # border so that no sample point is clamped.
    rois = torch.tensor([[0., 6., 4., 30., 22.], [1., 3., 5., 17., 27.],
                         [1., 10., 8., 34., 20.]])
    out = RoIAlign((out_h, out_w), spatial_scale, sampling_ratio, 'avg',
                   aligned)(feats, rois)
    assert out.shape == (3, 2, out_h, out_w)

    # Bin centres in feature coordinates (pixel centres at integers): with
    # ``aligned`` the box is shifted by half a pixel and its size is used as
    # is; without it the box is not shifted and is at least one pixel wide.
    shift = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        b = int(b)
        roi_w = (x2 - x1) * spatial_scale
        roi_h = (y2 - y1) * spatial_scale
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        cx = x1 * spatial_scale - shift + (torch.arange(out_w) + 0.5) * (
            roi_w / out_w)
        cy = y1 * spatial_scale - shift + (torch.arange(out_h) + 0.5) * (
            roi_h / out_h)
        expected = (slope_x[b, :, None, None] * cx[None, None, :] +
                    slope_y[b, :, None, None] * cy[None, :, None] +
                    offset[b, :, None, None])
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize('aligned', [True, False])
def test_mmcv_roi_align_matches_torchvision(aligned: bool) -> None:
    from mmcv.ops import RoIAlign

    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 25, 31, generator=gen)
    xy = torch.rand(20, 2, generator=gen) * 40
    wh = torch.rand(20, 2, generator=gen) * 30 + 0.5
    batch = torch.randint(0, 2, (20, 1), generator=gen).float()
    rois = torch.cat([batch, xy, xy + wh], dim=1)  # may cross the border
    for sampling_ratio in (0, 2):
        out = RoIAlign((7, 7), 0.5, sampling_ratio, 'avg', aligned)(feats, rois)
        ref = torchvision.ops.roi_align(
            feats, rois, (7, 7), 0.5, sampling_ratio, aligned=aligned)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# (b) the OpenMMLab baselines, built from the wheels' own configs
# --------------------------------------------------------------------------


def _load_config(tmp_path: Path, base: str, overrides: str) -> Config:
    """Load ``base`` through ``_base_`` inheritance, as project configs do.

    ``Config.fromfile`` does not resolve ``pkg::`` paths itself, only in
    ``_base_``; this also checks that the wheels ship their configs.
    """
    path = tmp_path / f'cfg_{uuid.uuid4().hex}.py'
    path.write_text(f'_base_ = {base!r}\n{overrides}')
    return Config.fromfile(str(path))


def _random_image(gen: torch.Generator, height: int,
                  width: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), generator=gen,
                         dtype=torch.uint8)


def test_faster_rcnn_forward(tmp_path: Path) -> None:
    import mmdet.utils
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample

    cfg = _load_config(
        tmp_path, 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
        'model = dict(backbone=dict(init_cfg=None),\n'
        '             test_cfg=dict(rcnn=dict(score_thr=0.0)))\n')
    assert cfg.model.type == 'FasterRCNN'
    assert cfg.model.backbone.init_cfg is None
    num_classes = cfg.model.roi_head.bbox_head.num_classes
    max_per_img = cfg.model.test_cfg.rcnn.max_per_img
    assert (num_classes, max_per_img) == (80, 100)

    mmdet.utils.register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).eval()

        gen = torch.Generator().manual_seed(0)
        height, width = 128, 160
        samples = []
        for _ in range(2):
            sample = DetDataSample(
                metainfo=dict(
                    img_shape=(height, width),
                    ori_shape=(height, width),
                    scale_factor=(1.0, 1.0)))
            sample.gt_instances = InstanceData(
                bboxes=torch.tensor([[10., 20., 90., 100.],
                                     [60., 8., 150., 70.]]),
                labels=torch.tensor([3, 17]))
            samples.append(sample)
        data = dict(
            inputs=[_random_image(gen, height, width) for _ in range(2)],
            data_samples=samples)

        with torch.no_grad():
            results = model.test_step(copy.deepcopy(data))
            assert len(results) == 2
            for result in results:
                pred = result.pred_instances
                # score_thr=0 keeps every class of every proposal until the
                # per-image cap, so the cap is reached.
                assert pred.bboxes.shape == (max_per_img, 4)
                assert pred.scores.shape == pred.labels.shape == (
                    max_per_img, )
                assert bool((pred.scores[:-1] >= pred.scores[1:]).all())
                assert 0 <= int(pred.labels.min())
                assert int(pred.labels.max()) < num_classes
                # Boxes are clipped to the image.
                assert bool((pred.bboxes[:, 0::2] >= 0).all())
                assert bool((pred.bboxes[:, 0::2] <= width).all())
                assert bool((pred.bboxes[:, 1::2] >= 0).all())
                assert bool((pred.bboxes[:, 1::2] <= height).all())

            batch = model.data_preprocessor(copy.deepcopy(data), True)
            losses = model(**batch, mode='loss')
        for key in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox'):
            values = losses[key]
            values = values if isinstance(values, list) else [values]
            assert all(bool(torch.isfinite(v).all()) for v in values), key
        # An untrained 81-way classifier sits near chance: CE ~ ln(81).
        assert 0.5 * math.log(81) < float(losses['loss_cls']) < 2 * math.log(
            81)


def test_deeplabv3_forward(tmp_path: Path) -> None:
    import mmseg.utils
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    bn = "dict(type='BN', requires_grad=True)"
    cfg = _load_config(
        tmp_path,
        'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py',
        f'model = dict(pretrained=None,\n'
        f'             backbone=dict(norm_cfg={bn}, init_cfg=None),\n'
        f'             decode_head=dict(norm_cfg={bn}),\n'
        f'             auxiliary_head=dict(norm_cfg={bn}))\n')
    assert cfg.model.type == 'EncoderDecoder'
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    num_classes = cfg.model.decode_head.num_classes
    assert num_classes == 21  # VOC

    mmseg.utils.register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmseg'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).eval()
        assert not any(
            isinstance(m, nn.SyncBatchNorm) for m in model.modules())

        gen = torch.Generator().manual_seed(0)
        height, width = 64, 96
        samples = []
        for _ in range(2):
            label = torch.randint(0, num_classes, (1, height, width),
                                  generator=gen)
            samples.append(
                SegDataSample(
                    metainfo=dict(
                        img_shape=(height, width), ori_shape=(height, width)),
                    gt_sem_seg=PixelData(data=label)))
        data = dict(
            inputs=[_random_image(gen, height, width) for _ in range(2)],
            data_samples=samples)

        with torch.no_grad():
            batch = model.data_preprocessor(data, False)
            # Eval mode: dropout off and BN on running statistics, so the loss
            # and predict paths see the same logits.
            losses = model.loss(batch['inputs'], batch['data_samples'])
            results = model.predict(batch['inputs'],
                                    copy.deepcopy(batch['data_samples']))

    assert set(losses) == {
        'decode.loss_ce', 'decode.acc_seg', 'aux.loss_ce', 'aux.acc_seg'
    }
    logits = torch.stack([r.seg_logits.data for r in results])
    preds = torch.stack([r.pred_sem_seg.data for r in results])
    labels = torch.stack([s.gt_sem_seg.data for s in samples])
    assert logits.shape == (2, num_classes, height, width)
    assert preds.shape == (2, 1, height, width)
    assert torch.equal(preds, logits.argmax(dim=1, keepdim=True))
    torch.testing.assert_close(
        losses['decode.loss_ce'], F.cross_entropy(logits, labels[:, 0]))
    accuracy = 100.0 * (preds == labels).float().mean()
    torch.testing.assert_close(
        losses['decode.acc_seg'].reshape(()), accuracy, rtol=0, atol=1e-3)


def test_resnet50_classifier_forward(tmp_path: Path) -> None:
    import mmpretrain.utils
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    cfg = _load_config(tmp_path, 'mmpretrain::resnet/resnet50_8xb32_in1k.py',
                       '')
    assert cfg.model.type == 'ImageClassifier'
    assert cfg.model.backbone.depth == 50
    # mmpretrain keeps the data preprocessor at the top level of its configs
    # and the runner moves it into the model; do the same.
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    num_classes = model_cfg.head.num_classes
    assert num_classes == 1000

    mmpretrain.utils.register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        torch.manual_seed(0)
        model = MODELS.build(model_cfg).eval()

        gen = torch.Generator().manual_seed(0)
        gt = torch.randint(0, num_classes, (3, ), generator=gen)
        data = dict(
            inputs=[_random_image(gen, 64, 64) for _ in range(3)],
            data_samples=[DataSample().set_gt_label(int(g)) for g in gt])
        with torch.no_grad():
            batch = model.data_preprocessor(data, False)
            losses = model.loss(batch['inputs'], batch['data_samples'])
            results = model.predict(batch['inputs'],
                                    copy.deepcopy(batch['data_samples']))

    assert set(losses) == {'loss'}
    scores = torch.stack([r.pred_score for r in results])
    assert scores.shape == (3, num_classes)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(3))
    labels = torch.cat([r.pred_label for r in results])
    assert torch.equal(labels, scores.argmax(dim=1))
    # Cross-entropy of the training path == -log p(gt) of the predict path.
    expected_loss = -scores[torch.arange(3), gt].log().mean()
    torch.testing.assert_close(
        losses['loss'], expected_loss, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# (c) resuming from a checkpoint written by mmengine's Runner
# --------------------------------------------------------------------------


class _ToyDataset(Dataset):
    """Eight samples of a noiseless linear regression."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(8, 2, generator=gen)
        self.targets = self.inputs @ torch.tensor([[1.5], [-2.0]]) + 0.5

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return dict(inputs=self.inputs[index], targets=self.targets[index])


class _ToyModel(BaseModel):

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self,
                inputs: torch.Tensor,
                targets: torch.Tensor,
                mode: str = 'tensor'):
        outputs = self.linear(inputs)
        if mode == 'loss':
            return dict(loss=F.mse_loss(outputs, targets))
        return outputs


class _RecordStateHook(Hook):
    """Records what ``Runner.load_or_resume`` restored before training."""

    def __init__(self) -> None:
        self.iter = None
        self.optimizer_state: Dict = {}
        self.model_state: Dict = {}

    def before_train(self, runner: Runner) -> None:
        self.iter = runner.iter
        self.optimizer_state = copy.deepcopy(
            runner.optim_wrapper.optimizer.state_dict())
        self.model_state = copy.deepcopy(runner.model.state_dict())


def _toy_runner(work_dir: Path,
                max_iters: int,
                resume: bool,
                custom_hooks: List[Hook] = ()) -> Runner:
    return Runner(
        model=_ToyModel(),
        work_dir=str(work_dir),
        experiment_name=f'toy_{uuid.uuid4().hex}',
        train_dataloader=dict(
            dataset=_ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            collate_fn=dict(type='default_collate'),
            batch_size=2,
            num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=2,
                            by_epoch=False)),
        custom_hooks=list(custom_hooks),
        randomness=dict(seed=0),
        resume=resume,
        default_scope='mmengine',
        log_level='WARNING')


def _assert_same_state(actual: Dict, expected: Dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_same_state(actual[key], value)
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0)
        else:
            assert actual[key] == value, key


def test_runner_checkpoint_resumes(tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first = _toy_runner(tmp_path, max_iters=2, resume=False)
    first.train()
    checkpoint = tmp_path / 'iter_2.pth'
    assert checkpoint.is_file()
    trained_optimizer = copy.deepcopy(
        first.optim_wrapper.optimizer.state_dict())
    trained_model = copy.deepcopy(first.model.state_dict())
    # Two SGD steps with momentum leave a non-zero momentum buffer to restore.
    buffers = [
        state['momentum_buffer']
        for state in trained_optimizer['state'].values()
    ]
    assert buffers and all(bool(b.abs().sum() > 0) for b in buffers)

    # The premise: mmengine pickles more than tensors (message hub
    # HistoryBuffers, numpy arrays), which torch's default refuses to load...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint)
    # ...and so does mmengine's own, unpatched local loader.
    patched = CheckpointLoader._schemes['']
    original = getattr(patched, '__wrapped__', patched)
    with pytest.raises(pickle.UnpicklingError):
        original(str(checkpoint), 'cpu')

    # With sar_backbones.compat, ``resume=True`` restores the iteration,
    # optimizer and model state, and training carries on from there; the
    # patched loader still unpickles weights-only, with mmengine's types
    # allowed for that one call (torch.load's default is unchanged).
    assert CheckpointLoader._schemes[''] is patched
    assert isinstance(patched(str(checkpoint), 'cpu')['message_hub'], dict)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint)
    record = _RecordStateHook()
    second = _toy_runner(
        tmp_path, max_iters=3, resume=True, custom_hooks=[record])
    second.train()
    assert record.iter == 2
    _assert_same_state(record.optimizer_state, trained_optimizer)
    _assert_same_state(record.model_state, trained_model)
    assert second.iter == 3

    # Without the patch the same resume fails.
    monkeypatch.setitem(CheckpointLoader._schemes, '', original)
    third = _toy_runner(tmp_path, max_iters=4, resume=True)
    with pytest.raises(pickle.UnpicklingError):
        third.train()
    monkeypatch.undo()

    # A checkpoint that would run code when unpickled is refused, naming the
    # file (tests/robustness/test_checkpoints.py covers every loading path).
    from sar_backbones.models.backbones.checkpoint import UnsafeCheckpointError
    evil = tmp_path / 'evil.pth'
    torch.save(dict(state_dict={}, message_hub=_Exec('raise SystemExit(3)')), evil)
    with pytest.raises(UnsafeCheckpointError, match=f'{evil}.*builtins.exec'):
        CheckpointLoader._schemes[''](str(evil), 'cpu')


class _Exec:
    """Unpickles to ``exec(code)``: what a malicious checkpoint carries."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code, )
