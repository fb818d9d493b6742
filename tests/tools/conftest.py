"""Fixtures of the tool tests (helpers: ``sar_tool_helpers``)."""
from pathlib import Path

import pytest

from tools.datasets.generate_shape_datasets import generate_imagenet


@pytest.fixture(scope='session')
def imagenet_data(tmp_path_factory) -> Path:
    """Two training and one validation image per class (5 classes), 64x64."""
    root = tmp_path_factory.mktemp('sar_tools_data')
    generate_imagenet(root, num_train_per_class=2, num_val_per_class=1, image_size=64)
    return root
