"""Data-set level activation rates and effective FLOPs (paper Fig. 5).

A trained SAR backbone chooses how much of each image it refines, so its cost
varies per image. :func:`measure_rates` runs the backbone (deterministic
inference masks) over images and collects ``get_activation_rates()``;
:func:`rate_statistics` turns them into the paper's numbers (mean/std of the
rate and of the effective FLOPs, per stage and per block) with
:func:`~.complexity.model_complexity`, grouping images by input shape; and
:func:`plot_rate_flops_histogram` draws the per-image histograms of Fig. 5.
"""
import math
import os
import os.path as osp
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..engine.hooks import get_sar_backbone
from .complexity import model_complexity

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
# ImageNet statistics in RGB order (the shipped configs' data preprocessors).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


# -------------------------------------------------------------------- images

def list_images(path: str, limit: Optional[int] = None) -> List[str]:
    """Image files under ``path`` (a file or a folder, searched recursively), sorted."""
    if osp.isfile(path):
        return [path]
    if not osp.isdir(path):
        raise FileNotFoundError(f'no image file or folder at {path}')
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(osp.join(root, name))
    found.sort()
    if not found:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {path}')
    return found[:limit] if limit else found


def load_image(path: str) -> np.ndarray:
    """An RGB ``uint8`` array ``(H, W, 3)``."""
    from PIL import Image
    with Image.open(path) as img:
        return np.asarray(img.convert('RGB'))


def resize_image(image: np.ndarray, size: Tuple[int, int], keep_ratio: bool = False,
                 pad_divisor: int = 1) -> np.ndarray:
    """Resize an RGB array to ``size`` (H, W); with ``keep_ratio`` fit inside it (mmdet style).

    ``keep_ratio`` scales the image so that it fits in ``size`` either way
    round (long side <= max(size), short side <= min(size)), as mmdet's
    ``Resize(scale=(1333, 800), keep_ratio=True)``; ``pad_divisor`` then pads
    the bottom/right with zeros to a multiple (mmdet pads to 32).
    """
    from PIL import Image
    h, w = image.shape[:2]
    if keep_ratio:
        long_edge, short_edge = max(size), min(size)
        scale = min(long_edge / max(h, w), short_edge / min(h, w))
        out_h, out_w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    else:
        out_h, out_w = size
    if (out_h, out_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR))
    if pad_divisor > 1:
        ph = math.ceil(out_h / pad_divisor) * pad_divisor
        pw = math.ceil(out_w / pad_divisor) * pad_divisor
        if (ph, pw) != (out_h, out_w):
            padded = np.zeros((ph, pw, 3), dtype=image.dtype)
            padded[:out_h, :out_w] = image
            image = padded
    return image


def image_to_tensor(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Normalised ``(1, 3, H, W)`` float tensor of an RGB ``uint8`` array."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def load_image_tensor(path: str, size: Tuple[int, int], keep_ratio: bool = False,
                      pad_divisor: int = 1) -> Tensor:
    """:func:`load_image` -> :func:`resize_image` -> :func:`image_to_tensor`."""
    return image_to_tensor(resize_image(load_image(path), size, keep_ratio, pad_divisor))


def folder_inputs(path: str, size: Tuple[int, int], limit: Optional[int] = None,
                  keep_ratio: bool = False, pad_divisor: int = 1) -> Iterator[Tuple[str, Tensor]]:
    """``(path, (1, 3, H, W))`` for the images of a folder, preprocessed as described."""
    for file in list_images(path, limit):
        yield file, load_image_tensor(file, size, keep_ratio, pad_divisor)


def dataloader_inputs(model: nn.Module, cfg, limit: Optional[int] = None,
                      split: str = 'test') -> Iterator[Tuple[str, Tensor]]:
    """``(name, inputs)`` from a config's ``{split}_dataloader``, through the data preprocessor.

    One image at a time (batch 1, no workers), exactly as the task's test
    pipeline and ``data_preprocessor`` prepare it (resize, normalise, pad).
    """
    import copy

    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.get(f'{split}_dataloader'))
    if loader_cfg is None:
        raise ValueError(f'the config has no {split}_dataloader')
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
    loader_cfg.pop('batch_sampler', None)
    loader = Runner.build_dataloader(loader_cfg)
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            break
        data = model.data_preprocessor(batch, False)
        inputs = data['inputs']
        samples = data.get('data_samples') or []
        name = str(index)
        if samples:
            meta = getattr(samples[0], 'metainfo', {}) or {}
            name = meta.get('img_path', name)
        yield name, inputs


# -------------------------------------------------------------- measurement

def measure_rates(model: nn.Module, inputs: Iterable[Tuple[str, Tensor]],
                  progress: bool = False) -> Dict[str, object]:
    """Run the backbone over ``inputs``; per-image activation rates and input shapes.

    Uses the learned, deterministic inference masks: any mask override is
    lifted for the run and restored after it.

    Returns:
        dict: ``names`` (list), ``shapes`` (list of ``(C, H, W)``) and
        ``rates`` (``(images, blocks)`` tensor, float64).
    """
    backbone = get_sar_backbone(model)
    names, shapes, rates = [], [], []
    with backbone.temporary_settings(training=False, mask_rate=None), torch.no_grad():
        for index, (name, x) in enumerate(inputs):
            param = next(backbone.parameters())
            backbone(x.to(param.device, param.dtype))
            r = backbone.get_activation_rates().double().cpu()
            for row in range(r.shape[0]):
                names.append(name if r.shape[0] == 1 else f'{name}[{row}]')
                shapes.append(tuple(x.shape[1:]))
                rates.append(r[row])
            if progress and (index + 1) % 50 == 0:
                print(f'  {index + 1} images', flush=True)
    if not rates:
        raise ValueError('no images to measure')
    return {'names': names, 'shapes': shapes, 'rates': torch.stack(rates)}


def _mean_std(values: Tensor) -> Tuple[float, float]:
    values = values.double()
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return float(values.mean()), std


def rate_statistics(model: nn.Module, measured: Dict[str, object],
                    num_classes: Optional[int] = None,
                    reference_flops: Optional[Dict[Tuple[int, ...], float]] = None
                    ) -> Dict[str, object]:
    """Paper-convention statistics of measured rates (see :func:`measure_rates`).

    FLOPs per image come from :func:`model_complexity` at that image's input
    shape and rates (one counting pass per distinct shape).

    Returns:
        dict with ``num_images``, ``params``, ``activation_rate`` {mean, std},
        ``stage_rates`` (list of {mean, std}, one per SAR stage: the
        unweighted mean of its blocks' rates, as ``act_rate_stage{i}``),
        ``block_rates`` (mean per masked block), ``target_rate`` (``t``),
        ``max_stage_deviation`` (max over stages of ``|stage rate - t|``),
        ``flops`` {mean, std, min, max} (MACs), ``flops_dense`` and
        ``flops_static`` (mean over images),
        ``per_image`` (list of {name, shape, rate, flops}), and
        ``reference_flops`` / ``flops_ratio`` when a reference is given.
    """
    backbone = get_sar_backbone(model)
    rates: Tensor = measured['rates']
    shapes: List[tuple] = measured['shapes']
    names: List[str] = measured['names']
    flops = torch.zeros(len(shapes), dtype=torch.float64)
    dense = torch.zeros_like(flops)
    static = torch.zeros_like(flops)
    params = None
    by_shape: 'OrderedDict[tuple, List[int]]' = OrderedDict()
    for index, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(index)
    for shape, indices in by_shape.items():
        comp = model_complexity(backbone, shape, activation_rate=rates[indices],
                                num_classes=num_classes)
        params = comp['params']
        flops[indices] = torch.tensor(comp['flops_per_image'], dtype=torch.float64)
        dense[indices] = comp['flops_dense']
        static[indices] = comp['flops_static']
    image_rates = rates.mean(dim=1)
    rate_mean, rate_std = _mean_std(image_rates)
    flops_mean, flops_std = _mean_std(flops)
    stage_rates = [dict(zip(('mean', 'std'), _mean_std(rates[:, cols].mean(dim=1))))
                   for cols in backbone.stage_block_slices()]
    target = float(backbone.target_rate)
    stats: Dict[str, object] = {
        'num_images': len(shapes),
        'params': params,
        'input_shapes': sorted({list(s).__repr__() for s in shapes}),
        'activation_rate': {'mean': rate_mean, 'std': rate_std},
        'stage_rates': stage_rates,
        'block_rates': rates.mean(dim=0).tolist(),
        'target_rate': target,
        'max_stage_deviation': max(abs(s['mean'] - target) for s in stage_rates),
        'flops': {'mean': flops_mean, 'std': flops_std, 'min': float(flops.min()),
                  'max': float(flops.max())},
        'flops_dense': float(dense.mean()),
        'flops_static': float(static.mean()),
        'per_image': [{'name': n, 'shape': list(s), 'rate': float(r), 'flops': float(f)}
                      for n, s, r, f in zip(names, shapes, image_rates, flops)],
    }
    if reference_flops:
        ref = torch.tensor([reference_flops[tuple(s)] for s in shapes], dtype=torch.float64)
        stats['reference_flops'] = float(ref.mean())
        stats['flops_ratio'] = float((flops / ref).mean())
    return stats


def plot_rate_flops_histogram(stats: Dict[str, object], path: str, title: str = '',
                              bins: int = 20, reference_flops: Optional[float] = None,
                              reference_label: str = 'ResNet') -> str:
    """Fig. 5: histograms of per-image activation rate and effective GFLOPs, saved as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rates = np.array([p['rate'] for p in stats['per_image']])
    gflops = np.array([p['flops'] for p in stats['per_image']]) / 1e9
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, values, label in ((axes[0], rates, 'activation rate'),
                              (axes[1], gflops, 'effective GFLOPs (MACs)')):
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo
        edges = np.linspace(lo - 0.05 * span - 1e-9, hi + 0.05 * span + 1e-9, bins + 1) \
            if span > 0 else bins
        ax.hist(values, bins=edges, color='#4C72B0', edgecolor='white')
        ax.axvline(values.mean(), color='#C44E52', linestyle='--',
                   label=f'mean {values.mean():.3g}')
        ax.set_xlabel(label)
        ax.set_ylabel('images')
    if reference_flops:
        axes[1].axvline(reference_flops / 1e9, color='#55A868', linestyle=':',
                        label=f'{reference_label} {reference_flops / 1e9:.3g}')
    for ax in axes:
        ax.legend(fontsize=8)
    n = stats['num_images']
    fig.suptitle(title or f'SAR-ResNet: per-image activation rate and FLOPs ({n} images)')
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def assumed_rate_complexity(model: nn.Module, input_shape: Sequence[int], rate,
                            num_classes: Optional[int] = None) -> Dict[str, object]:
    """:func:`model_complexity` at an assumed rate, with per-stage refine FLOPs added."""
    backbone = get_sar_backbone(model)
    comp = model_complexity(backbone, input_shape, activation_rate=rate, num_classes=num_classes)
    refine = comp['flops_refine']
    comp['flops_refine_per_stage'] = [float(sum(refine[s])) for s in backbone.stage_block_slices()]
    return comp


def is_sar_model(model: nn.Module) -> bool:
    try:
        get_sar_backbone(model)
        return True
    except TypeError:
        return False


__all__ = [
    'list_images', 'load_image', 'resize_image', 'image_to_tensor', 'load_image_tensor',
    'folder_inputs', 'dataloader_inputs', 'measure_rates', 'rate_statistics',
    'plot_rate_flops_histogram', 'assumed_rate_complexity', 'is_sar_model'
]
