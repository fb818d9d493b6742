"""Fixtures of the task-integration tests (helpers: ``sar_task_configs``)."""
from pathlib import Path

import pytest
import torch

from sar_backbones.datasets.generate import generate_coco, generate_imagenet, generate_voc

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


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread, then restore the setting.

    `make test` runs two pytest workers on two cores; with two threads each,
    the workers' OpenMP barriers spin against each other and a small forward
    pass can take a hundred times longer.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
