"""Shipped task configs adapted to tiny generated data (integration tests).

Every test here starts from a config under ``configs/`` exactly as shipped and
changes only what a CPU test must: SyncBN -> BN, the data roots (small data
sets made by ``tools/datasets/generate_shape_datasets.py``), image scales, loop lengths
and the pretrained-weights path (no ImageNet run exists here).
"""
import copy
import json
from pathlib import Path

from mmengine.config import Config

from sar_backbones.engine import swap_sync_bn

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / 'configs'

FASTER_RCNN = CONFIGS / 'faster_rcnn' / 'faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'
RETINANET = CONFIGS / 'retinanet' / 'retinanet_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'
DEEPLABV3 = (CONFIGS / 'deeplabv3' /
             'deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py')
PSPNET = CONFIGS / 'pspnet' / 'pspnet_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py'
CLASSIFIER = CONFIGS / 'sar_resnet' / 'sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'

# Small inputs keep a ResNet-50 step well under a second on two cores.
DET_SCALE = (128, 96)
SEG_SCALE = (128, 96)
SEG_CROP = (64, 64)


def _small_loader(loader: dict, dataset: dict, batch_size: int) -> dict:
    loader = copy.deepcopy(loader)
    loader.update(batch_size=batch_size, num_workers=0, persistent_workers=False)
    loader['dataset'] = dataset
    return loader


def _set_scale(pipeline: list, scale: tuple) -> list:
    pipeline = copy.deepcopy(pipeline)
    for step in pipeline:
        if step['type'] in ('Resize', 'RandomResize'):
            step['scale'] = scale
        if step['type'] == 'RandomCrop':
            step['crop_size'] = SEG_CROP
        if step['type'] == 'Pad':
            step['size'] = SEG_CROP
    return pipeline


def _common_runtime(cfg: Config, work_dir: Path) -> None:
    cfg.work_dir = str(work_dir)
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.visualization = dict(type=cfg.default_hooks.visualization.type)
    cfg.env_cfg.dist_cfg = dict(backend='gloo')
    cfg.randomness = dict(seed=0)
    # No ImageNet run exists in a test; the converter tests cover loading.
    cfg.model.backbone.init_cfg = None
    swap_sync_bn(cfg)


def tiny_det_config(path: Path, data_root: Path, work_dir: Path) -> Config:
    """A shipped COCO config on the generated COCO set, one short epoch."""
    cfg = Config.fromfile(str(path))
    coco = data_root / 'coco'
    train_pipe = _set_scale(cfg.train_dataloader.dataset.pipeline, DET_SCALE)
    test_pipe = _set_scale(cfg.test_dataloader.dataset.pipeline, DET_SCALE)
    train_set = dict(cfg.train_dataloader.dataset, data_root=str(coco),
                     ann_file='annotations/instances_train2017.json',
                     data_prefix=dict(img='train2017/'), pipeline=train_pipe)
    val_set = dict(cfg.val_dataloader.dataset, data_root=str(coco),
                   ann_file='annotations/instances_val2017.json',
                   data_prefix=dict(img='val2017/'), pipeline=test_pipe)
    cfg.train_dataloader = _small_loader(cfg.train_dataloader, train_set, 2)
    cfg.val_dataloader = _small_loader(cfg.val_dataloader, val_set, 1)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator.ann_file = str(coco / 'annotations/instances_val2017.json')
    cfg.test_evaluator = cfg.val_evaluator
    cfg.train_cfg.max_epochs = 1
    if 'rcnn' in cfg.model.train_cfg:
        # Faster R-CNN's RoI head dominates the cost of a tiny image
        # (512 sampled RoIs x a 12.8 MMAC fc per image): sample fewer.
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=64)
        cfg.model.train_cfg.rcnn.sampler.num = 32
        cfg.model.test_cfg.rpn.update(nms_pre=200, max_per_img=64)
    # An untrained detector scores below the default 0.05; keep every box so
    # that COCO evaluation has detections to score.
    test_cfg = cfg.model.test_cfg.get('rcnn', cfg.model.test_cfg)
    test_cfg.score_thr = 0.
    _common_runtime(cfg, work_dir)
    return cfg


def tiny_seg_config(path: Path, data_root: Path, work_dir: Path, iters: int = 2) -> Config:
    """A shipped VOC config on the generated VOC set, a few iterations."""
    cfg = Config.fromfile(str(path))
    voc = data_root / 'VOCdevkit' / 'VOC2012'
    train_set = dict(
        type=cfg.dataset_type, data_root=str(voc),
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/train.txt',
        pipeline=_set_scale(cfg.train_pipeline, SEG_SCALE))
    val_set = dict(cfg.val_dataloader.dataset, data_root=str(voc),
                   ann_file='ImageSets/Segmentation/val.txt',
                   pipeline=_set_scale(cfg.test_pipeline, SEG_SCALE))
    cfg.train_dataloader = _small_loader(cfg.train_dataloader, train_set, 2)
    cfg.val_dataloader = _small_loader(cfg.val_dataloader, val_set, 1)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.model.data_preprocessor.size = SEG_CROP
    cfg.data_preprocessor.size = SEG_CROP
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    cfg.param_scheduler[0].end = iters
    cfg.default_hooks.checkpoint.interval = iters
    _common_runtime(cfg, work_dir)
    return cfg


def tiny_cls_config(path: Path, data_root: Path, work_dir: Path) -> Config:
    """A shipped ImageNet config on the generated ImageNet set, one epoch."""
    cfg = Config.fromfile(str(path))
    imagenet = data_root / 'imagenet'
    train_pipe = copy.deepcopy(cfg.train_dataloader.dataset.pipeline)
    for step in train_pipe:
        if step['type'] == 'RandomResizedCrop':
            step['scale'] = 64
    test_pipe = copy.deepcopy(cfg.val_dataloader.dataset.pipeline)
    for step in test_pipe:
        if step['type'] == 'ResizeEdge':
            step['scale'] = 72
        if step['type'] == 'CenterCrop':
            step['crop_size'] = 64
    train_set = dict(cfg.train_dataloader.dataset, data_root=str(imagenet), pipeline=train_pipe)
    val_set = dict(cfg.val_dataloader.dataset, data_root=str(imagenet), pipeline=test_pipe)
    cfg.train_dataloader = _small_loader(cfg.train_dataloader, train_set, 4)
    cfg.val_dataloader = _small_loader(cfg.val_dataloader, val_set, 4)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.train_cfg.max_epochs = 1
    _common_runtime(cfg, work_dir)
    return cfg


def use_coco_categories(coco_root: Path) -> None:
    """List COCO's 80 categories in the generated annotation files.

    The generated shapes keep their category ids 1-5 (now named person ...
    airplane), so the shipped 80-class heads, mmdet's default ``CocoDataset``
    classes and ``CocoMetric`` all apply unchanged.
    """
    from mmdet.datasets import CocoDataset

    names = CocoDataset.METAINFO['classes']
    for path in (coco_root / 'annotations').glob('instances_*.json'):
        content = json.loads(path.read_text())
        content['categories'] = [dict(id=i + 1, name=name, supercategory='coco')
                                 for i, name in enumerate(names)]
        path.write_text(json.dumps(content))
