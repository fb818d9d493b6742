"""Helpers of the tool tests: a config for tiny ImageNet-style data."""
from pathlib import Path

from ..script_loading import REPO

CONFIGS = REPO / 'configs'

TINY_CLS_CONFIG = """_base_ = {base!r}
# The shipped ImageNet config on the generated 64x64 ImageNet-style set.
data_root = {data_root!r}
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='RandomResizedCrop', scale=64),
        dict(type='RandomFlip', prob=0.5, direction='horizontal'),
        dict(type='PackInputs')]))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='ResizeEdge', scale=72, edge='short'),
        dict(type='CenterCrop', crop_size=64),
        dict(type='PackInputs')]))
test_dataloader = val_dataloader
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
"""


def write_tiny_cls_config(shipped: Path, data_root: Path, out: Path) -> Path:
    """Write a config inheriting ``shipped`` that trains on ``data_root``."""
    out.write_text(TINY_CLS_CONFIG.format(base=str(shipped),
                                          data_root=str(data_root / 'imagenet')))
    return out
