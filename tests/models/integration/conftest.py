"""Fixtures of the task-integration tests (helpers: ``sar_task_configs``)."""
from pathlib import Path

import pytest

from tools.datasets.generate_shape_datasets import generate_coco, generate_imagenet, generate_voc
from .sar_task_configs import use_coco_categories


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Path:
    """COCO, VOC and ImageNet layouts with a handful of small images."""
    root = tmp_path_factory.mktemp('sar_data')
    generate_coco(root, num_train=4, num_val=2, image_size=(64, 96))
    use_coco_categories(root / 'coco')
    generate_voc(root, num_train=4, num_val=2, image_size=(64, 96))
    generate_imagenet(root, num_train_per_class=2, num_val_per_class=1, image_size=64)
    return root
