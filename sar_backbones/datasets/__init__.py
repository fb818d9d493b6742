"""Synthetic data sets in the ImageNet, COCO and VOC on-disk formats.

numpy, Pillow and pycocotools make them; see :mod:`.generate`.
"""
import importlib
from typing import Any

__all__ = [
    'CLASSES', 'PALETTE', 'SEG_CLASSES', 'SEG_PALETTE', 'VOC_PALETTE', 'Scene',
    'classification_scene', 'detection_scene', 'generate_all', 'generate_coco',
    'generate_imagenet', 'generate_voc', 'mask_to_rle', 'tight_bbox'
]


def __getattr__(name: str) -> Any:
    """Import :mod:`.generate` on first use.

    An eager import would make ``python -m sar_backbones.datasets.generate``
    load the module twice (runpy warns about exactly that).
    """
    if name in __all__:
        return getattr(importlib.import_module(f'{__name__}.generate'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
