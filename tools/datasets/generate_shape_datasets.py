"""Generate small synthetic data sets in the real on-disk formats.

No data set can be downloaded where this project runs, so tests and the demo
pipelines train on data made here. One scene generator feeds three formats, so
that classification pretraining transfers to detection and segmentation:

* ``imagenet/``: mmpretrain ``ImageNet`` / ``CustomDataset`` layout, one
  dominant object per image, ``train/<class>/*.JPEG`` plus ``meta/train.txt``
  (``relative/path label`` lines) and ``classes.txt``.
* ``coco/``: ``train2017/``, ``val2017/`` and
  ``annotations/instances_{train,val}2017.json`` with boxes, areas and
  instance masks of the visible part of each object (compressed RLE,
  ``pycocotools.mask.encode``).
* ``VOCdevkit/VOC2012/``: ``JPEGImages/``, palette PNGs in
  ``SegmentationClass/`` (0 background, 1..C objects, 255 for a thin ignore band
  along every boundary as in real VOC) and ``ImageSets/Segmentation``.

COCO and VOC are rendered from the same scene stream, so with equal settings
they hold the same images. Every image draws from its own random stream,
derived from ``(seed, task, split, index)``; adding images never changes
existing ones, and output bytes depend only on the arguments.

The generator writes only what it owns: ``dataset_info.json`` lists every
file it wrote, with a hash of its bytes, and a later run replaces or deletes
only listed files that are unchanged. Files of the user next to them are left
alone; a file in the way, or a ``dataset_info.json`` of another program, is
an error, and all arguments are checked before the first byte is written.

numpy, Pillow and (for the COCO masks) pycocotools are needed. Command line::

    python tools/datasets/generate_shape_datasets.py --out data/demo --task all
"""
from __future__ import annotations
import argparse
import colorsys
import hashlib
import io
import json
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Alphabetical on purpose: mmpretrain's folder layout numbers classes by sorted
# folder name, so this order keeps folder and annotation-file labels equal.
CLASSES: Tuple[str, ...] = ('circle', 'cross', 'ring', 'square', 'triangle')
SEG_CLASSES: Tuple[str, ...] = ('background', ) + CLASSES
# Hue (degrees) of each class; jittered per object and mixed with clutter of
# arbitrary colour so that colour alone does not solve the task.
CLASS_HUES: Tuple[float, ...] = (0.0, 55.0, 125.0, 215.0, 290.0)
# Share of objects painted in a random hue: shape must carry the label too.
OFF_COLOUR_PROB = 0.25
IGNORE_INDEX = 255

DEFAULT_SEED = 0
DEFAULT_CLS_SIZE = 64
DEFAULT_CLS_TRAIN_PER_CLASS = 100
DEFAULT_CLS_VAL_PER_CLASS = 20
DEFAULT_SCENE_SIZE = (128, 160)
DEFAULT_NUM_TRAIN = 200
DEFAULT_NUM_VAL = 50
DEFAULT_MAX_OBJECTS = 3
DEFAULT_IGNORE_RADIUS = 1

INFO_FILE = 'dataset_info.json'
# Names this generator in dataset_info.json (__name__ is '__main__' when run as a
# script); data written before it moved out of the package carries the old name.
GENERATOR = 'tools/datasets/generate_shape_datasets.py'
EARLIER_GENERATORS = ('sar_backbones.datasets.generate', )
SPLITS = ('train', 'val')
_SPLIT_IDS = {'train': 0, 'val': 1}
_STREAM_IDS = {'imagenet': 0, 'scenes': 1}
# COCO image ids are global across splits; val ids live in their own range so
# that they do not depend on the number of training images.
_ID_OFFSETS = {'train': 1, 'val': 1_000_001}
_JPEG_OPTIONS = dict(quality=90, subsampling=0)


def _voc_palette() -> List[int]:
    """Return the standard 256-entry PASCAL VOC colour map, flattened RGB.

    Entry ``i`` spreads the bits of ``i`` over the three channels, most
    significant bit first, which gives 0 black, 1 dark red, ..., 255 cream.
    """
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        value = index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette.extend(rgb)
    return palette


VOC_PALETTE: List[int] = _voc_palette()
# Per-class colours for mmseg (with background) and mmdet / mmpretrain metainfo.
SEG_PALETTE: List[List[int]] = [VOC_PALETTE[3 * i:3 * i + 3] for i in range(len(SEG_CLASSES))]
PALETTE: List[List[int]] = SEG_PALETTE[1:]


# --------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------
@dataclass
class Scene:
    """One rendered image with its exact per-pixel ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB image.
        instance_map: ``(H, W)`` int16 map, -1 for background, otherwise the
            index into ``labels`` of the object visible at that pixel.
        labels: Class index of each object, in drawing order (later objects
            occlude earlier ones).
        primary: Index of the object that gives a classification image its
            label; None for detection scenes.
    """

    image: np.ndarray
    instance_map: np.ndarray
    labels: List[int] = field(default_factory=list)
    primary: Optional[int] = None

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.image.shape[1])

    def object_mask(self, index: int) -> np.ndarray:
        """Return the visible pixels of object ``index`` as a bool map."""
        return self.instance_map == index

    def semantic_map(self, ignore_radius: int = DEFAULT_IGNORE_RADIUS) -> np.ndarray:
        """Return the VOC-style class map of the scene.

        Args:
            ignore_radius: Pixels closer than this (chessboard distance) to a
                pixel of another class become ``IGNORE_INDEX``; 0 disables the
                band.

        Returns:
            ``(H, W)`` uint8 map: 0 background, ``label + 1`` for objects.
        """
        lookup = np.array([0] + [label + 1 for label in self.labels], dtype=np.uint8)
        semantic = lookup[self.instance_map.astype(np.int64) + 1]
        if ignore_radius > 0:
            low, high = _window_min_max(semantic, ignore_radius)
            semantic = np.where(low != high, np.uint8(IGNORE_INDEX), semantic)
        return semantic


@dataclass
class _Shape:
    """Geometry of one object; ``radius`` is its outer half-extent."""

    label: int
    cx: float
    cy: float
    radius: float
    angle: float
    stretch: Tuple[float, float]
    detail: float  # ring: inner/outer radius ratio; cross: arm half-width ratio


def _rng_for(seed: int, stream: str, split: str, *ids: int) -> np.random.Generator:
    """Return the independent random stream of one image."""
    entropy = [int(seed), _STREAM_IDS[stream], _SPLIT_IDS[split], *map(int, ids)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _window_min_max(values: np.ndarray, radius: int) -> Tuple[np.ndarray, np.ndarray]:
    """Min and max over a ``(2r+1)^2`` window; edges are replicated so that
    the image border itself never counts as a boundary."""
    height, width = values.shape
    padded = np.pad(values, radius, mode='edge')
    low = values.copy()
    high = values.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            view = padded[dy:dy + height, dx:dx + width]
            np.minimum(low, view, out=low)
            np.maximum(high, view, out=high)
    return low, high


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a square of side ``2r+1`` (edge-replicated)."""
    return _window_min_max(mask.astype(np.uint8), radius)[0].astype(bool)


def _hsv(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    """HSV (hue in degrees) to an RGB float vector in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, saturation, value),
                    dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int,
                  channels: int) -> np.ndarray:
    """Bilinearly upsampled random grid: smooth blobs of about ``size/cells``."""
    grid = rng.random((cells + 1, cells + 1, channels), dtype=np.float32)
    ys = np.linspace(0.0, cells, height, dtype=np.float32)
    xs = np.linspace(0.0, cells, width, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), cells - 1)
    x0 = np.minimum(xs.astype(np.int64), cells - 1)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _wave(rng: np.random.Generator, height: int, width: int, period: float) -> np.ndarray:
    """Sinusoidal stripes in [-1, 1] with random direction and phase."""
    theta = rng.uniform(0.0, math.pi)
    phase = rng.uniform(0.0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    return np.sin(2 * math.pi * along / period + phase)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, so that backgrounds rarely mimic objects."""
    return _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.45), rng.uniform(0.25, 0.85))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured background: gradient, stripes or colour noise, plus grain."""
    first, second = _muted_colour(rng), _muted_colour(rng)
    kind = int(rng.integers(3))
    if kind == 0:
        mix = _smooth_noise(rng, height, width, int(rng.integers(2, 7)), 1)
    elif kind == 1:
        mix = (0.5 + 0.5 * _wave(rng, height, width, rng.uniform(1.5, 4.0) * max(height, width)))
        mix = mix[..., None]
    else:
        period = rng.uniform(5.0, 24.0)
        mix = (0.5 + 0.5 * rng.uniform(0.3, 1.0) * _wave(rng, height, width, period))[..., None]
    image = first * (1 - mix) + second * mix
    image += 0.12 * (_smooth_noise(rng, height, width, int(rng.integers(3, 9)), 3) - 0.5)
    image += rng.normal(0.0, 0.02, size=(height, width, 3)).astype(np.float32)
    return image


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int,
                  max_extent: float) -> np.ndarray:
    """Draw strokes and small irregular blobs of arbitrary colour.

    They are background in every annotation: a model has to use shape, not
    just colour, to find objects.
    """
    canvas = Image.fromarray(_to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    for _ in range(count):
        colour = tuple(int(c) for c in np.round(255 * _hsv(
            rng.uniform(0, 360), rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.95))))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        extent = rng.uniform(0.3, 1.0) * max_extent
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * math.pi)
            end = (cx + extent * 2 * math.cos(angle), cy + extent * 2 * math.sin(angle))
            draw.line([(cx, cy), end], fill=colour, width=int(rng.integers(1, 3)))
        else:
            corners = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
            radii = extent * rng.uniform(0.3, 1.0, corners)
            points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]
            draw.polygon(points, fill=colour)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] to uint8 with rounding."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _shape_window(shape: _Shape, height: int, width: int) -> Tuple[int, int, int, int]:
    """Integer box ``(y0, y1, x0, x1)`` that contains the whole shape, clipped."""
    reach = shape.radius * max(shape.stretch) + 2
    y0 = int(max(0, math.floor(shape.cy - reach)))
    y1 = int(min(height, math.ceil(shape.cy + reach)))
    x0 = int(max(0, math.floor(shape.cx - reach)))
    x1 = int(min(width, math.ceil(shape.cx + reach)))
    return y0, y1, x0, x1


def _inside(shape: _Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape test in the shape's own (rotated, stretched) frame."""
    name = CLASSES[shape.label]
    r = shape.radius
    if name == 'circle':
        return u * u + v * v <= (0.9 * r)**2
    if name == 'ring':
        dist2 = u * u + v * v
        return (dist2 <= (0.95 * r)**2) & (dist2 >= (shape.detail * r)**2)
    if name == 'square':
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75 * r
    if name == 'cross':
        arm, half = shape.detail * r, 0.95 * r
        abs_u, abs_v = np.abs(u), np.abs(v)
        return ((abs_u <= half) & (abs_v <= arm)) | ((abs_v <= half) & (abs_u <= arm))
    if name == 'triangle':
        # Equilateral with circumradius r: inside all three edges at r/2.
        inside = np.ones(u.shape, dtype=bool)
        for normal in (90.0, 210.0, 330.0):
            phi = math.radians(normal)
            inside &= u * math.cos(phi) + v * math.sin(phi) <= 0.5 * r
        return inside
    raise ValueError(f'unknown class {name}')


def _rasterise(shape: _Shape, height: int, width: int) -> np.ndarray:
    """Bool mask of the pixels whose centre lies inside the shape."""
    mask = np.zeros((height, width), dtype=bool)
    y0, y1, x0, x1 = _shape_window(shape, height, width)
    if y0 >= y1 or x0 >= x1:
        return mask
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs + 0.5 - shape.cx, ys + 0.5 - shape.cy
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    u = (dx * cos + dy * sin) / shape.stretch[0]
    v = (-dx * sin + dy * cos) / shape.stretch[1]
    mask[y0:y1, x0:x1] = _inside(shape, u, v)
    return mask


def _object_appearance(rng: np.random.Generator, label: int, height: int,
                       width: int) -> np.ndarray:
    """Class-hued colour layer with jitter, shading and its own texture."""
    hue = CLASS_HUES[label] + rng.uniform(-14, 14)
    if rng.random() < OFF_COLOUR_PROB:
        hue = rng.uniform(0, 360)
    colour = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95))
    kind = int(rng.integers(3))
    amplitude = rng.uniform(0.08, 0.25)
    if kind == 0:
        pattern = _wave(rng, height, width, rng.uniform(2.0, 4.0) * max(height, width))
    elif kind == 1:
        pattern = _wave(rng, height, width, rng.uniform(3.0, 9.0))
    else:
        pattern = 2 * _smooth_noise(rng, height, width, int(rng.integers(3, 8)), 1)[..., 0] - 1
    layer = colour[None, None, :] * (1.0 + amplitude * pattern[..., None])
    return layer.astype(np.float32)


def _sample_shape(rng: np.random.Generator, label: int, height: int, width: int,
                  radius_range: Tuple[float, float], centre_margin: float) -> _Shape:
    """Random geometry: log-uniform size, so that small objects are common.

    ``centre_margin`` is the fraction of the radius that must stay inside the
    image: below 1, objects may be cut by the image border.
    """
    low, high = radius_range
    radius = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    margin = centre_margin * radius
    cx = rng.uniform(margin, max(margin, width - margin))
    cy = rng.uniform(margin, max(margin, height - margin))
    stretch = (float(math.exp(rng.uniform(-0.15, 0.15))), float(math.exp(rng.uniform(-0.15, 0.15))))
    if CLASSES[label] == 'ring':
        detail = rng.uniform(0.45, 0.65)
    elif CLASSES[label] == 'cross':
        detail = rng.uniform(0.2, 0.34)
    else:
        detail = 0.0
    return _Shape(label, float(cx), float(cy), radius, float(rng.uniform(0, 2 * math.pi)),
                  stretch, float(detail))


def _placement_ok(instance_map: np.ndarray, full_areas: Sequence[int], min_area: int,
                  core_radius: int) -> bool:
    """Whether every object stays learnable and annotatable after occlusion.

    Each object must keep half of its in-image area, ``min_area`` pixels and
    some pixels farther than ``core_radius`` from its outline, so that the
    VOC ignore band never swallows an object whole.
    """
    for index, full_area in enumerate(full_areas):
        visible = instance_map == index
        area = int(visible.sum())
        if area < min_area or area < 0.5 * full_area:
            return False
        if not _erode(visible, core_radius).any():
            return False
    return True


def _paint(image: np.ndarray, instance_map: np.ndarray, mask: np.ndarray, index: int,
           layer: np.ndarray) -> None:
    """Write an object's colour layer and index into its pixels, in place."""
    image[mask] = layer[mask]
    instance_map[mask] = index


def render_detection_scene(rng: np.random.Generator,
                           size_range: Tuple[int, int] = DEFAULT_SCENE_SIZE,
                           max_objects: int = DEFAULT_MAX_OBJECTS,
                           min_area: int = 30, tries: int = 25) -> Scene:
    """Render a scene of 1..``max_objects`` objects of random classes.

    Args:
        rng: Random stream of this image.
        size_range: Inclusive range of both image sides; each side is drawn
            independently, so images are generally not square.
        max_objects: Upper bound of the number of objects.
        min_area: Minimum number of visible pixels of every object.
        tries: Attempts to place one object before giving it up.

    Returns:
        The scene; it always holds at least one object.
    """
    height = int(rng.integers(size_range[0], size_range[1] + 1))
    width = int(rng.integers(size_range[0], size_range[1] + 1))
    image = _background(rng, height, width)
    image = _draw_clutter(rng, image, int(rng.integers(3, 11)), 0.06 * min(height, width))
    instance_map = np.full((height, width), -1, dtype=np.int16)
    radius_range = (6.0, 0.36 * min(height, width))
    labels: List[int] = []
    full_areas: List[int] = []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(wanted):
        label = int(rng.integers(len(CLASSES)))
        for _attempt in range(tries):
            shape = _sample_shape(rng, label, height, width, radius_range, centre_margin=0.7)
            mask = _rasterise(shape, height, width)
            candidate = instance_map.copy()
            candidate[mask] = len(labels)
            if _placement_ok(candidate, full_areas + [int(mask.sum())], min_area, core_radius=2):
                _paint(image, instance_map, mask, len(labels),
                       _object_appearance(rng, label, height, width))
                labels.append(label)
                full_areas.append(int(mask.sum()))
                break
    if not labels:
        # Tiny images can reject every try; one centred object is always valid.
        shape = _Shape(int(rng.integers(len(CLASSES))), width / 2, height / 2,
                       0.4 * min(height, width), 0.0, (1.0, 1.0), 0.5)
        _paint(image, instance_map, _rasterise(shape, height, width), 0,
               _object_appearance(rng, shape.label, height, width))
        labels.append(shape.label)
    return Scene(_to_uint8(image), instance_map, labels)


def render_classification_scene(rng: np.random.Generator, label: int,
                                size: int = DEFAULT_CLS_SIZE,
                                distractor_prob: float = 0.3) -> Scene:
    """Render a square image dominated by one object of class ``label``.

    With probability ``distractor_prob`` a small object of another class is
    drawn first, partly hidden by the dominant one, so that the classifier has
    to attend to the largest object rather than to any class colour.

    Args:
        rng: Random stream of this image.
        label: Class index of the dominant object.
        size: Image side in pixels.
        distractor_prob: Probability of adding a distractor object.

    Returns:
        The scene; ``primary`` indexes the dominant object.
    """
    image = _background(rng, size, size)
    image = _draw_clutter(rng, image, int(rng.integers(1, 6)), 0.07 * size)
    instance_map = np.full((size, size), -1, dtype=np.int16)
    labels: List[int] = []
    if rng.random() < distractor_prob:
        other = int((label + rng.integers(1, len(CLASSES))) % len(CLASSES))
        shape = _sample_shape(rng, other, size, size, (0.09 * size, 0.15 * size), centre_margin=1.0)
        _paint(image, instance_map, _rasterise(shape, size, size), 0,
               _object_appearance(rng, other, size, size))
        labels.append(other)
    shape = _sample_shape(rng, label, size, size, (0.24 * size, 0.42 * size), centre_margin=1.05)
    _paint(image, instance_map, _rasterise(shape, size, size), len(labels),
           _object_appearance(rng, label, size, size))
    labels.append(label)
    return Scene(_to_uint8(image), instance_map, labels, primary=len(labels) - 1)


def classification_scene(seed: int, split: str, label: int, index: int,
                         size: int = DEFAULT_CLS_SIZE) -> Scene:
    """Return image ``index`` of class ``label`` exactly as the ImageNet writer draws it."""
    return render_classification_scene(_rng_for(seed, 'imagenet', split, label, index), label, size)


def detection_scene(seed: int, split: str, index: int,
                    size_range: Tuple[int, int] = DEFAULT_SCENE_SIZE,
                    max_objects: int = DEFAULT_MAX_OBJECTS) -> Scene:
    """Return scene ``index`` exactly as the COCO and VOC writers draw it."""
    return render_detection_scene(_rng_for(seed, 'scenes', split, index), size_range, max_objects)


# --------------------------------------------------------------------------
# Masks to COCO annotations
# --------------------------------------------------------------------------
def mask_to_rle(mask: np.ndarray) -> Dict[str, object]:
    """Encode a bool mask as COCO's compressed RLE (``pycocotools.mask.encode``).

    RLE is exact for any pixel set (holes, diagonal pinches) and is what
    pycocotools, mmdet's ``LoadAnnotations`` (``with_mask=True`` with the
    default ``poly2mask=True``) and COCO's ``segm`` evaluation decode. Only
    ``poly2mask=False`` (``PolygonMasks``) cannot take RLE: mmdet then marks
    the instances as ignored, as it does for crowd regions of real COCO.

    Args:
        mask: ``(H, W)`` bool map.

    Returns:
        ``{'size': [H, W], 'counts': str}``; counts as text, so that the
        annotation file is plain JSON.
    """
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return dict(size=[int(mask.shape[0]), int(mask.shape[1])],
                counts=rle['counts'].decode('ascii'))


def tight_bbox(mask: np.ndarray) -> List[float]:
    """COCO ``[x, y, w, h]`` box of the pixels of ``mask`` (pixel corners)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]),
            float(rows[-1] + 1 - rows[0])]


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
TASKS = ('imagenet', 'coco', 'voc')
# Where each task writes, relative to the output root.
TASK_ROOTS = {'imagenet': 'imagenet', 'coco': 'coco', 'voc': 'VOCdevkit'}
MIN_SIDE = 32  # below that the scenes cannot hold an object with a core
MAX_SIDE = 4096
# Train ids are 1..N and val ids start at 1_000_001: more training scenes
# would give two images the same COCO id.
MAX_SCENES = _ID_OFFSETS['val'] - _ID_OFFSETS['train']
MAX_PER_CLASS = 99_999  # file names carry five digits
MAX_OBJECTS = 50


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> int:
    """An integer (bools and floats refused) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'{name} must be an integer, got {value!r}')
    if value < low or (high is not None and value > high):
        bounds = f'>= {low}' if high is None else f'in [{low}, {high}]'
        raise ValueError(f'{name} must be {bounds}, got {value}')
    return int(value)


def _check_counts(**counts: object) -> Dict[str, int]:
    """Image counts are at least one: empty splits break the loaders."""
    return {name: _check_int(name, value, 1, MAX_SCENES) for name, value in counts.items()}


def _check_size_range(size_range: object, name: str = 'image_size') -> Tuple[int, int]:
    """One side or an inclusive ``(min, max)`` side range, ``MIN_SIDE <= min <= max``."""
    if isinstance(size_range, (str, bytes)) or not isinstance(size_range, Sequence):
        raise ValueError(f'{name} must be one or two integers (min, max), got {size_range!r}')
    if len(size_range) not in (1, 2):
        raise ValueError(f'{name} takes one or two values (min, max), got {len(size_range)}')
    low, high = (_check_int(name, side, MIN_SIDE, MAX_SIDE) for side in
                 (size_range[0], size_range[-1]))
    if low > high:
        raise ValueError(f'{name} must satisfy min <= max, got {list(size_range)}')
    return low, high


def _check_tasks(tasks: Iterable[str]) -> List[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(dict.fromkeys(tasks))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f'tasks must be a non-empty subset of {list(TASKS)}, got {tasks}')
    return tasks


def _check_out_dir(out_dir: object) -> Path:
    """The output root: a folder, or a path where one can be made."""
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f'out_dir must be a path, got {out_dir!r}')
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f'{path} exists and is not a directory')
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f'{parent} is a file, so {path} cannot be made')
            break
    return path


# --------------------------------------------------------------------------
# Files this generator owns
# --------------------------------------------------------------------------
def _digest(data: bytes) -> str:
    """Short content hash: tells a file we wrote from one edited since."""
    return hashlib.sha256(data).hexdigest()[:16]


def _read_info(out_dir: Path) -> dict:
    """This generator's ``dataset_info.json`` in ``out_dir`` ({} if none).

    Raises:
        FileExistsError: If the file exists but another program wrote it.
    """
    path = out_dir / INFO_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        info = None
    if not isinstance(info, dict) or info.get('generator') not in (GENERATOR, *EARLIER_GENERATORS):
        raise FileExistsError(f'{path} exists and was not written by {GENERATOR}; '
                              'choose another output folder')
    return info


def _owned_files(info: dict, task: str) -> Optional[Dict[str, Optional[str]]]:
    """``relative path -> digest`` of a task's files (None: no file list).

    A digest is None for files of a run that was interrupted while writing.
    """
    files = info.get('files', {}).get(task)
    return None if files is None else dict(files)


def _check_replaceable(out_dir: Path, planned: Dict[str, List[str]], info: dict) -> None:
    """Everything a run would replace or delete must be a file it wrote itself.

    Checked for every task before anything is written.

    Raises:
        FileExistsError: Naming the first file or folder in the way.
    """
    for task, paths in planned.items():
        owned = _owned_files(info, task)
        root = out_dir / TASK_ROOTS[task]
        if owned is None:
            if root.is_dir() and any(root.iterdir()):
                raise FileExistsError(
                    f'{root} holds files this generator did not list as its own '
                    '(real data, or data of an older version); choose another output folder')
            owned = {}
        for relative, digest in owned.items():
            path = out_dir / relative
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise FileExistsError(f'{path} was replaced since it was generated; '
                                      'move it away first')
            if digest is not None and path.is_file() and _digest(path.read_bytes()) != digest:
                raise FileExistsError(f'{path} was modified since it was generated; '
                                      'move it away first')
        for relative in paths:
            path = out_dir / relative
            if (path.exists() or path.is_symlink()) and relative not in owned:
                raise FileExistsError(f'{path} exists and was not written by this generator; '
                                      'choose another output folder')
        for folder in sorted({(out_dir / relative).parent for relative in paths}):
            for parent in [folder, *folder.parents]:
                if parent == out_dir or out_dir not in parent.parents:
                    break
                if parent.exists() and not parent.is_dir():
                    raise FileExistsError(f'{parent} is a file where this generator needs a '
                                          'folder; move it away first')


class _Output:
    """Writes the planned files of one run and keeps the manifest current.

    The manifest is the ``files`` entry of ``dataset_info.json``: per task,
    every file this generator wrote with the hash of its bytes. A run
    replaces or deletes only files listed there (and unchanged), so a
    user's file inside a generated folder is never touched.

    Args:
        out_dir: Output root.
        planned: Task -> every path (relative to ``out_dir``) it will write.
        info: The current content of ``dataset_info.json`` (checked).
    """

    def __init__(self, out_dir: Path, planned: Dict[str, List[str]], info: dict) -> None:
        self.out_dir = out_dir
        self.planned = {task: set(paths) for task, paths in planned.items()}
        self.info = info
        self.written: Dict[str, Dict[str, str]] = {task: {} for task in planned}

    def begin(self) -> None:
        """Record the planned files, then delete the task's stale files.

        The manifest lists the planned files before any is written, so an
        interrupted run leaves nothing that a later run cannot replace.
        """
        files = self.info.setdefault('files', {})
        stale: List[Path] = []
        for task, paths in self.planned.items():
            owned = _owned_files(self.info, task) or {}
            stale += [self.out_dir / p for p in owned if p not in paths]
            entry = {p: None for p in paths}
            entry.update({p: d for p, d in owned.items() if p not in paths})
            files[task] = entry
            self.info.setdefault('tasks', {}).pop(task, None)
        self._save_info()
        for path in stale:
            if path.is_file():
                path.unlink()
            self._remove_empty_parents(path)
        for task in self.planned:
            files[task] = {p: None for p in sorted(self.planned[task])}
        self._save_info()

    def write(self, task: str, relative: str, data: bytes) -> None:
        """Write one planned file."""
        if relative not in self.planned[task]:
            raise RuntimeError(f'{relative} is not a planned file of {task}')  # a bug here
        path = self.out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written[task][relative] = _digest(data)

    def finish(self, entries: Dict[str, dict]) -> dict:
        """Record the written files and the tasks' entries; return the info."""
        for task, paths in self.planned.items():
            missing = paths - set(self.written[task])
            if missing:
                raise RuntimeError(f'{task}: planned files not written: {sorted(missing)[:3]}')
            self.info['files'][task] = dict(sorted(self.written[task].items()))
            self.info['tasks'][task] = entries[task]
        self._save_info()
        return self.info

    def _save_info(self) -> None:
        self.info.update(generator=GENERATOR, classes=list(CLASSES),
                         seg_classes=list(SEG_CLASSES), palette=PALETTE,
                         seg_palette=SEG_PALETTE, ignore_index=IGNORE_INDEX,
                         class_hues=list(CLASS_HUES))
        self.info.setdefault('tasks', {})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / INFO_FILE).write_text(json.dumps(self.info, indent=2, sort_keys=True)
                                              + '\n')

    def _remove_empty_parents(self, path: Path) -> None:
        """Remove the folders a deleted file leaves empty, up to the output root."""
        for parent in path.parents:
            if parent == self.out_dir or self.out_dir not in parent.parents:
                return
            if not parent.is_dir() or any(parent.iterdir()):
                return
            parent.rmdir()


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------
def _encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of an RGB uint8 image (deterministic for given pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', **_JPEG_OPTIONS)
    return buffer.getvalue()


def _encode_label_png(semantic: np.ndarray) -> bytes:
    """Palette ('P' mode) PNG bytes of a class-index map, as VOC stores them."""
    height, width = semantic.shape
    label = Image.frombytes('P', (width, height), np.ascontiguousarray(semantic).tobytes())
    label.putpalette(VOC_PALETTE)
    buffer = io.BytesIO()
    label.save(buffer, format='PNG')
    return buffer.getvalue()


def _imagenet_name(label: int, index: int) -> str:
    """``<class>/<class>_<index>.JPEG``, relative to the split folder."""
    name = CLASSES[label]
    return f'{name}/{name}_{index:05d}.JPEG'


def _imagenet_files(per_class: Dict[str, int]) -> List[str]:
    files = ['imagenet/classes.txt']
    for split in SPLITS:
        files.append(f'imagenet/meta/{split}.txt')
        files += [f'imagenet/{split}/{_imagenet_name(label, index)}'
                  for label in range(len(CLASSES)) for index in range(per_class[split])]
    return files


def _scene_ids(split: str, count: int) -> List[int]:
    return [_ID_OFFSETS[split] + index for index in range(count)]


def _coco_files(counts: Dict[str, int]) -> List[str]:
    files = []
    for split in SPLITS:
        files.append(f'coco/annotations/instances_{split}2017.json')
        files += [f'coco/{split}2017/{image_id:012d}.jpg'
                  for image_id in _scene_ids(split, counts[split])]
    return files


VOC_DIR = 'VOCdevkit/VOC2012'


def _voc_files(counts: Dict[str, int]) -> List[str]:
    files = []
    for split in SPLITS:
        files.append(f'{VOC_DIR}/ImageSets/Segmentation/{split}.txt')
        for image_id in _scene_ids(split, counts[split]):
            files += [f'{VOC_DIR}/JPEGImages/{image_id:012d}.jpg',
                      f'{VOC_DIR}/SegmentationClass/{image_id:012d}.png']
    return files


def _write_imagenet(output: _Output, per_class: Dict[str, int], image_size: int,
                    seed: int) -> dict:
    """Render and write the ImageNet-style set; return its info entry."""
    output.write('imagenet', 'imagenet/classes.txt',
                 ''.join(f'{name}\n' for name in CLASSES).encode())
    for split in SPLITS:
        lines = []
        for label in range(len(CLASSES)):
            for index in range(per_class[split]):
                relative = _imagenet_name(label, index)
                scene = classification_scene(seed, split, label, index, image_size)
                output.write('imagenet', f'imagenet/{split}/{relative}',
                             _encode_jpeg(scene.image))
                lines.append(f'{relative} {label}\n')
        output.write('imagenet', f'imagenet/meta/{split}.txt', ''.join(lines).encode())
    return dict(root='imagenet', seed=seed, image_size=[image_size] * 2,
                per_class=dict(per_class),
                num_images={s: n * len(CLASSES) for s, n in per_class.items()})


class _CocoWriter:
    """Accumulates one COCO split and writes its images as they come."""

    def __init__(self, output: _Output, split: str) -> None:
        self.output = output
        self.split = split
        self.images: List[dict] = []
        self.annotations: List[dict] = []

    def add(self, image_id: int, scene: Scene, jpeg: bytes) -> None:
        """Write one image and record its objects."""
        file_name = f'{image_id:012d}.jpg'
        self.output.write('coco', f'coco/{self.split}2017/{file_name}', jpeg)
        self.images.append(dict(id=image_id, file_name=file_name, height=scene.height,
                                width=scene.width))
        for index, label in enumerate(scene.labels):
            mask = scene.object_mask(index)
            self.annotations.append(dict(
                id=len(self.annotations) + 1, image_id=image_id, category_id=label + 1,
                bbox=tight_bbox(mask), area=float(mask.sum()), iscrowd=0,
                segmentation=mask_to_rle(mask)))

    def close(self) -> dict:
        """Write the annotation file; return the split's counts."""
        content = dict(
            info=dict(description='sar_backbones synthetic shapes (COCO format)', version='1.0',
                      year=2017, contributor='sar_backbones', url='', date_created=''),
            licenses=[],
            images=self.images,
            annotations=self.annotations,
            categories=[dict(id=i + 1, name=name, supercategory='shape')
                        for i, name in enumerate(CLASSES)])
        self.output.write('coco', f'coco/annotations/instances_{self.split}2017.json',
                          json.dumps(content, separators=(',', ':')).encode())
        return dict(images=len(self.images), annotations=len(self.annotations))


class _VocWriter:
    """Writes one VOC segmentation split."""

    def __init__(self, output: _Output, split: str, ignore_radius: int) -> None:
        self.output = output
        self.split = split
        self.ignore_radius = ignore_radius
        self.names: List[str] = []

    def add(self, image_id: int, scene: Scene, jpeg: bytes) -> None:
        """Write one image and its label PNG."""
        name = f'{image_id:012d}'
        self.output.write('voc', f'{VOC_DIR}/JPEGImages/{name}.jpg', jpeg)
        self.output.write('voc', f'{VOC_DIR}/SegmentationClass/{name}.png',
                          _encode_label_png(scene.semantic_map(self.ignore_radius)))
        self.names.append(name)

    def close(self) -> dict:
        """Write the split's image list; return its counts."""
        self.output.write('voc', f'{VOC_DIR}/ImageSets/Segmentation/{self.split}.txt',
                          ''.join(f'{name}\n' for name in self.names).encode())
        return dict(images=len(self.names))


def _write_scene_sets(output: _Output, tasks: Sequence[str], counts: Dict[str, int],
                      image_size: Tuple[int, int], max_objects: int, seed: int,
                      ignore_radius: int) -> Dict[str, dict]:
    """Render each scene once and hand it to every requested format."""
    summary: Dict[str, dict] = {task: {} for task in tasks}
    for split in SPLITS:
        writers = []
        if 'coco' in tasks:
            writers.append(('coco', _CocoWriter(output, split)))
        if 'voc' in tasks:
            writers.append(('voc', _VocWriter(output, split, ignore_radius)))
        objects = 0
        for index, image_id in enumerate(_scene_ids(split, counts[split])):
            scene = detection_scene(seed, split, index, image_size, max_objects)
            objects += len(scene.labels)
            jpeg = _encode_jpeg(scene.image)
            for _, writer in writers:
                writer.add(image_id, scene, jpeg)
        for task, writer in writers:
            summary[task][split] = dict(writer.close(), objects=objects)
    entries = {}
    for task in tasks:
        entries[task] = dict(root='coco' if task == 'coco' else VOC_DIR, seed=seed,
                             image_size_range=list(image_size), max_objects=max_objects,
                             splits=summary[task])
        if task == 'voc':
            entries[task]['ignore_radius'] = ignore_radius
    return entries


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def generate_all(out_dir: str | Path, tasks: Iterable[str] = TASKS,
                 num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                 image_size: Sequence[int] = DEFAULT_SCENE_SIZE,
                 cls_num_train: int = DEFAULT_CLS_TRAIN_PER_CLASS,
                 cls_num_val: int = DEFAULT_CLS_VAL_PER_CLASS,
                 cls_image_size: int = DEFAULT_CLS_SIZE,
                 max_objects: int = DEFAULT_MAX_OBJECTS, seed: int = DEFAULT_SEED,
                 ignore_radius: int = DEFAULT_IGNORE_RADIUS, dry_run: bool = False) -> dict:
    """Write the requested data sets under ``out_dir``.

    COCO and VOC are rendered in one pass over the same scenes. Every
    argument and every file in the way is checked before anything is
    written. The run writes only the files it plans (listed with their
    hashes in ``dataset_info.json``); regenerating replaces or deletes only
    files an earlier run listed there and that are unchanged since. Anything
    else in the output folder is left alone, and a file in the way is an
    error.

    Args:
        out_dir: Output root; ``dataset_info.json`` goes there.
        tasks: Any of ``'imagenet'``, ``'coco'``, ``'voc'``.
        num_train: COCO / VOC training images.
        num_val: COCO / VOC validation images.
        image_size: COCO / VOC inclusive ``(min, max)`` side range (or one side).
        cls_num_train: ImageNet training images per class.
        cls_num_val: ImageNet validation images per class.
        cls_image_size: ImageNet image side.
        max_objects: Most objects per COCO / VOC image.
        seed: Base seed (>= 0).
        ignore_radius: VOC ignore band half-width (0, 1 or 2).
        dry_run: Only check the arguments and the output folder; write nothing.

    Returns:
        The content of ``dataset_info.json`` (with ``dry_run``: ``{'files':
        {task: [paths the run would write]}}``).

    Raises:
        ValueError: For an argument out of range (nothing written).
        FileExistsError: If a file or folder this run would replace was not
            written by this generator (nothing written).
    """
    tasks = _check_tasks(tasks)
    seed = _check_int('seed', seed, 0)
    out_dir = _check_out_dir(out_dir)
    planned: Dict[str, List[str]] = {}
    if 'imagenet' in tasks:
        per_class = dict(train=_check_int('cls_num_train', cls_num_train, 1, MAX_PER_CLASS),
                         val=_check_int('cls_num_val', cls_num_val, 1, MAX_PER_CLASS))
        cls_size = _check_int('cls_image_size', cls_image_size, MIN_SIDE, MAX_SIDE)
        planned['imagenet'] = _imagenet_files(per_class)
    scene_tasks = [task for task in tasks if task in ('coco', 'voc')]
    if scene_tasks:
        counts = _check_counts(num_train=num_train, num_val=num_val)
        counts = dict(train=counts['num_train'], val=counts['num_val'])
        size_range = _check_size_range(image_size)
        max_objects = _check_int('max_objects', max_objects, 1, MAX_OBJECTS)
        if 'voc' in scene_tasks:
            # Scenes guarantee object cores only two pixels deep.
            ignore_radius = _check_int('ignore_radius', ignore_radius, 0, 2)
        if 'coco' in scene_tasks:
            planned['coco'] = _coco_files(counts)
        if 'voc' in scene_tasks:
            planned['voc'] = _voc_files(counts)
    info = _read_info(out_dir)
    _check_replaceable(out_dir, planned, info)
    if dry_run:
        return dict(files=planned)

    output = _Output(out_dir, planned, info)
    output.begin()
    entries = {}
    if 'imagenet' in planned:
        entries['imagenet'] = _write_imagenet(output, per_class, cls_size, seed)
    if scene_tasks:
        entries.update(_write_scene_sets(output, scene_tasks, counts, size_range, max_objects,
                                         seed, ignore_radius))
    return output.finish(entries)


def generate_imagenet(out_dir: str | Path, num_train_per_class: int = DEFAULT_CLS_TRAIN_PER_CLASS,
                      num_val_per_class: int = DEFAULT_CLS_VAL_PER_CLASS,
                      image_size: int = DEFAULT_CLS_SIZE, seed: int = DEFAULT_SEED) -> dict:
    """Write an ImageNet-style classification set to ``out_dir/imagenet``.

    Layout: ``{train,val}/<class>/<class>_<i>.JPEG``, ``meta/{train,val}.txt``
    with lines ``<class>/<file> <label>`` relative to the split folder (what
    mmpretrain's ``ImageNet(split=...)`` reads), and ``classes.txt``. What
    may be replaced: see :func:`generate_all`.

    Args:
        out_dir: Output root.
        num_train_per_class: Training images per class.
        num_val_per_class: Validation images per class.
        image_size: Side of the square images.
        seed: Base seed.

    Returns:
        The task's entry of ``dataset_info.json``.
    """
    info = generate_all(out_dir, ['imagenet'], cls_num_train=num_train_per_class,
                        cls_num_val=num_val_per_class, cls_image_size=image_size, seed=seed)
    return info['tasks']['imagenet']


def generate_coco(out_dir: str | Path, num_train: int = DEFAULT_NUM_TRAIN,
                  num_val: int = DEFAULT_NUM_VAL,
                  image_size: Sequence[int] = DEFAULT_SCENE_SIZE,
                  max_objects: int = DEFAULT_MAX_OBJECTS, seed: int = DEFAULT_SEED) -> dict:
    """Write a COCO-format detection / instance segmentation set to ``out_dir/coco``.

    Instance masks are compressed RLE (:func:`mask_to_rle`). What may be
    replaced: see :func:`generate_all`.

    Args:
        out_dir: Output root.
        num_train: Training images.
        num_val: Validation images.
        image_size: Inclusive ``(min, max)`` range of both image sides.
        max_objects: Most objects per image (at least one each).
        seed: Base seed.

    Returns:
        The task's entry of ``dataset_info.json``.
    """
    info = generate_all(out_dir, ['coco'], num_train=num_train, num_val=num_val,
                        image_size=image_size, max_objects=max_objects, seed=seed)
    return info['tasks']['coco']


def generate_voc(out_dir: str | Path, num_train: int = DEFAULT_NUM_TRAIN,
                 num_val: int = DEFAULT_NUM_VAL,
                 image_size: Sequence[int] = DEFAULT_SCENE_SIZE,
                 max_objects: int = DEFAULT_MAX_OBJECTS, seed: int = DEFAULT_SEED,
                 ignore_radius: int = DEFAULT_IGNORE_RADIUS) -> dict:
    """Write a VOC-format semantic segmentation set to ``out_dir/VOCdevkit/VOC2012``.

    What may be replaced: see :func:`generate_all`.

    Args:
        out_dir: Output root.
        num_train: Training images.
        num_val: Validation images.
        image_size: Inclusive ``(min, max)`` range of both image sides.
        max_objects: Most objects per image (at least one each).
        seed: Base seed.
        ignore_radius: Half-width of the 255 band along boundaries; 0 for none.

    Returns:
        The task's entry of ``dataset_info.json``.
    """
    info = generate_all(out_dir, ['voc'], num_train=num_train, num_val=num_val,
                        image_size=image_size, max_objects=max_objects, seed=seed,
                        ignore_radius=ignore_radius)
    return info['tasks']['voc']


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and check the command line (``sys.argv[1:]`` when ``argv`` is None).

    Every value is checked here, before anything is written; a mistake is
    one line on stderr and exit status 2.
    """
    from sar_backbones.utils.cli import ArgumentParser, count_between, int_in
    parser = ArgumentParser(
        prog='generate_shape_datasets.py', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', default='data/demo', help='output root')
    parser.add_argument('--task', nargs='+', default=['all'],
                        choices=['all', *TASKS], help='data sets to write')
    scenes, per_class = int_in(1, MAX_SCENES), int_in(1, MAX_PER_CLASS)
    parser.add_argument('--num-train', type=scenes, default=DEFAULT_NUM_TRAIN,
                        help='COCO / VOC training images')
    parser.add_argument('--num-val', type=scenes, default=DEFAULT_NUM_VAL,
                        help='COCO / VOC validation images')
    parser.add_argument('--image-size', type=int_in(MIN_SIDE, MAX_SIDE), nargs='+',
                        action=count_between(1, 2), default=list(DEFAULT_SCENE_SIZE),
                        metavar='SIDE', help='COCO / VOC side: one value, or MIN MAX for '
                        'sides drawn per image')
    parser.add_argument('--cls-num-train', type=per_class, default=DEFAULT_CLS_TRAIN_PER_CLASS,
                        help='ImageNet training images per class')
    parser.add_argument('--cls-num-val', type=per_class, default=DEFAULT_CLS_VAL_PER_CLASS,
                        help='ImageNet validation images per class')
    parser.add_argument('--cls-image-size', type=int_in(MIN_SIDE, MAX_SIDE),
                        default=DEFAULT_CLS_SIZE, help='ImageNet image side')
    parser.add_argument('--max-objects', type=int_in(1, MAX_OBJECTS), default=DEFAULT_MAX_OBJECTS,
                        help='most objects per COCO / VOC image')
    parser.add_argument('--ignore-radius', type=int_in(0, 2), default=DEFAULT_IGNORE_RADIUS,
                        help='VOC: half-width of the 255 boundary band (0, 1 or 2)')
    parser.add_argument('--seed', type=int_in(0), default=DEFAULT_SEED,
                        help='base random seed (>= 0)')
    args = parser.parse_args(argv)
    if args.image_size[0] > args.image_size[-1]:
        parser.error(f'argument --image-size: MIN must not exceed MAX, got {args.image_size}')
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f'argument --out: {out} exists and is not a directory')
    args.task = list(TASKS) if 'all' in args.task else list(dict.fromkeys(args.task))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python tools/datasets/generate_shape_datasets.py``).

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        0 on success, 2 when the arguments or the output folder are unusable
        (one line on stderr, nothing written), 1 when writing fails.
    """
    args = _parse_args(argv)
    start = time.perf_counter()
    try:
        info = generate_all(args.out, args.task, args.num_train, args.num_val,
                            (args.image_size[0], args.image_size[-1]), args.cls_num_train,
                            args.cls_num_val, args.cls_image_size, args.max_objects, args.seed,
                            args.ignore_radius)
    except (ValueError, FileExistsError) as error:
        print(f'generate_shape_datasets.py: error: {error}', file=sys.stderr)
        return 2
    except OSError as error:
        print(f'generate_shape_datasets.py: error: writing {args.out} failed: {error}',
              file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    for task in args.task:
        entry = info['tasks'][task]
        if task == 'imagenet':
            counts = ', '.join(f'{s} {n} images' for s, n in entry['num_images'].items())
        else:
            counts = ', '.join(f'{s} {c["images"]} images / {c["objects"]} objects'
                               for s, c in entry['splits'].items())
        print(f'{task:8s} -> {Path(args.out) / entry["root"]}: {counts}')
    print(f'classes: {", ".join(CLASSES)}; seed {args.seed}; {elapsed:.1f} s; '
          f'info in {Path(args.out) / INFO_FILE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
