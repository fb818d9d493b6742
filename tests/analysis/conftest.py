"""Shared fixtures of the analysis-tool tests."""
from pathlib import Path

import pytest

from tools.datasets.generate_shape_datasets import generate_imagenet


@pytest.fixture(scope='session')
def tiny_imagenet(tmp_path_factory) -> Path:
    """An ImageNet-layout set: 5 classes x 1 val image of 64x64 pixels."""
    root = tmp_path_factory.mktemp('analysis_data')
    generate_imagenet(root, num_train_per_class=1, num_val_per_class=1, image_size=64)
    return root / 'imagenet'
