"""Train shipped task configs briefly, evaluate, and run the OpenMMLab inferencers.

The checkpoints come from real (tiny) training runs on generated COCO / VOC
data; the inferencers then load the *shipped* config files exactly as a user
would call them, at the configs' full test resolution.
"""
import numpy as np
import torch
from mmengine.runner import Runner
from PIL import Image

from .sar_task_configs import DEEPLABV3, FASTER_RCNN, tiny_det_config, tiny_seg_config


def _assert_rate_metrics(metrics):
    assert 0. <= metrics['act_rate'] <= 1.
    for stage in (1, 2, 3):
        assert 0. <= metrics[f'act_rate_stage{stage}'] <= 1.
    assert metrics['effective_gflops'] > 0


def _assert_loaded(model, ckpt):
    state = torch.load(ckpt, map_location='cpu', weights_only=False)['state_dict']
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in own.items():
        assert torch.equal(value.cpu(), state[key]), key


# One test per task: each trains once (a module fixture could run once per
# xdist worker).
def test_detector_train_eval_and_det_inferencer(tiny_data, tmp_path):
    from mmdet.apis import DetInferencer

    runner = Runner.from_cfg(tiny_det_config(FASTER_RCNN, tiny_data, tmp_path))
    runner.train()
    ckpt = tmp_path / 'epoch_1.pth'
    metrics = runner.test()
    assert 'coco/bbox_mAP' in metrics
    _assert_rate_metrics(metrics)
    hub = runner.message_hub
    assert hub.get_scalar('test/act_rate').current() == metrics['act_rate']
    assert hub.get_scalar('test/coco/bbox_mAP').current() == metrics['coco/bbox_mAP']

    image = sorted((tiny_data / 'coco' / 'val2017').glob('*.jpg'))[0]
    inferencer = DetInferencer(model=str(FASTER_RCNN), weights=str(ckpt), device='cpu',
                               show_progress=False)
    backbone = inferencer.model.backbone
    assert type(inferencer.model).__name__ == 'SARFasterRCNN'
    _assert_loaded(inferencer.model, ckpt)
    assert not backbone.training and backbone.inference_mode == 'sparse'
    result = inferencer(str(image), no_save_vis=True, return_datasamples=False)
    (pred, ) = result['predictions']
    assert set(pred) >= {'labels', 'scores', 'bboxes'}
    assert len(pred['labels']) == len(pred['scores']) == len(pred['bboxes'])
    # The shipped test pipeline scales a 64-96 px image up to the 800x1333 range.
    rates = backbone.get_activation_rates()
    assert rates.shape[0] == 1 and ((rates >= 0) & (rates <= 1)).all()

    # Without a config: the inferencer rebuilds the model from the config the
    # runner stored in the checkpoint (sar_backbones is imported, see README).
    from_weights = DetInferencer(weights=str(ckpt), device='cpu', show_progress=False)
    assert type(from_weights.model).__name__ == 'SARFasterRCNN'
    _assert_loaded(from_weights.model, ckpt)


def test_segmentor_train_eval_and_seg_inferencer(tiny_data, tmp_path):
    from mmseg.apis import MMSegInferencer

    runner = Runner.from_cfg(tiny_seg_config(DEEPLABV3, tiny_data, tmp_path, iters=2))
    runner.train()
    ckpt = tmp_path / 'iter_2.pth'
    metrics = runner.test()
    assert 'mIoU' in metrics
    _assert_rate_metrics(metrics)

    image = sorted((tiny_data / 'VOCdevkit' / 'VOC2012' / 'JPEGImages').glob('*.jpg'))[0]
    inferencer = MMSegInferencer(model=str(DEEPLABV3), weights=str(ckpt), device='cpu')
    assert type(inferencer.model).__name__ == 'SAREncoderDecoder'
    _assert_loaded(inferencer.model, ckpt)
    result = inferencer(str(image), return_datasamples=False)
    width, height = Image.open(image).size
    prediction = np.asarray(result['predictions'])
    assert prediction.shape == (height, width)
    assert prediction.min() >= 0 and prediction.max() < 21
    rates = inferencer.model.backbone.get_activation_rates()
    assert rates.shape[0] == 1 and ((rates >= 0) & (rates <= 1)).all()
