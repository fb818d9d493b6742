"""Generate small synthetic data sets in the real on-disk formats.

No data set can be downloaded where this project runs, so tests and the demo
pipelines train on data made here. One scene generator feeds three formats, so
that classification pretraining transfers to detection and segmentation:

* ``imagenet/``: mmpretrain ``ImageNet`` / ``CustomDataset`` layout, one
  dominant object per image, ``train/<class>/*.JPEG`` plus ``meta/train.txt``
  (``relative/path label`` lines) and ``classes.txt``.
* ``coco/``: ``train2017/``, ``val2017/`` and
  ``annotations/instances_{train,val}2017.json`` with boxes, areas and polygon
  masks of the visible part of each object.
* ``VOCdevkit/VOC2012/``: ``JPEGImages/``, palette PNGs in
  ``SegmentationClass/`` (0 background, 1..C objects, 255 for a thin ignore band
  along every boundary as in real VOC) and ``ImageSets/Segmentation``.

COCO and VOC are rendered from the same scene stream, so with equal settings
they hold the same images. Every image draws from its own random stream,
derived from ``(seed, task, split, index)``; adding images never changes
existing ones, and output bytes depend only on the arguments.

Only numpy and Pillow are needed. Command line::

    python -m sar_backbones.datasets.generate --out data/demo --task all
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import shutil
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
# Names this module in dataset_info.json; __name__ is '__main__' under python -m.
GENERATOR = 'sar_backbones.datasets.generate'
# Written into each task folder: only folders carrying it are ever deleted, so
# pointing --out at real data cannot destroy it.
MARKER_FILE = '.sar_generated'
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
# Masks to COCO polygons
# --------------------------------------------------------------------------
_Point = Tuple[int, int]


def _boundary_edges(mask: np.ndarray) -> Dict[_Point, List[_Point]]:
    """Directed unit edges between object and background pixels.

    Vertices are pixel corners (pixel ``(r, c)`` spans ``[c, c+1] x [r, r+1]``,
    the convention of COCO polygons). Edges run with the object on their right
    in image coordinates (y down), so outer outlines have positive shoelace
    area and holes negative.

    Returns:
        Map from a start vertex ``(x, y)`` to the directions ``(dx, dy)`` of
        the edges that leave it (two at a diagonal pinch, else one).
    """
    padded = np.pad(mask, 1)
    edges: Dict[_Point, List[_Point]] = {}

    def add(rows: np.ndarray, cols: np.ndarray, start: Tuple[int, int], step: _Point) -> None:
        for y, x in zip(rows.tolist(), cols.tolist()):
            edges.setdefault((x + start[0], y + start[1]), []).append(step)

    # Row i of these diffs is the corner line y = i; column j is pixel column j-1.
    top_rows, top_cols = np.nonzero(padded[1:, :] & ~padded[:-1, :])
    add(top_rows, top_cols, (-1, 0), (1, 0))
    bottom_rows, bottom_cols = np.nonzero(padded[:-1, :] & ~padded[1:, :])
    add(bottom_rows, bottom_cols, (0, 0), (-1, 0))
    # Column j is the corner line x = j; row i is pixel row i-1.
    left_rows, left_cols = np.nonzero(padded[:, 1:] & ~padded[:, :-1])
    add(left_rows, left_cols, (0, 0), (0, -1))
    right_rows, right_cols = np.nonzero(padded[:, :-1] & ~padded[:, 1:])
    add(right_rows, right_cols, (0, -1), (0, 1))
    return edges


def _trace_loops(mask: np.ndarray) -> List[np.ndarray]:
    """Chain boundary edges into closed loops of corner vertices.

    At a pinch (two pixels touching only diagonally) the walk turns right
    first, which keeps following the same pixel: objects are 4-connected, and
    loops never cross themselves. That rule pairs incoming with outgoing edges
    once and for all, so every walk returns to its first edge.

    Returns:
        ``(N, 2)`` int arrays of ``(x, y)`` vertices, collinear points removed.
    """
    outgoing = _boundary_edges(mask)
    unused = {(vertex, step) for vertex, steps in outgoing.items() for step in steps}
    loops = []
    while unused:
        # min() rather than set order: the polygon's first vertex is part of the output bytes.
        start = min(unused)
        vertex, direction = start
        points: List[_Point] = []
        directions: List[_Point] = []
        while True:
            unused.remove((vertex, direction))
            points.append(vertex)
            directions.append(direction)
            vertex = (vertex[0] + direction[0], vertex[1] + direction[1])
            right, left = (-direction[1], direction[0]), (direction[1], -direction[0])
            direction = next(d for d in (right, direction, left) if d in outgoing[vertex])
            if (vertex, direction) == start:
                break
        loops.append(_drop_collinear(points, directions))
    return loops


def _drop_collinear(points: List[_Point], directions: List[_Point]) -> np.ndarray:
    """Keep only the vertices where the outline changes direction."""
    keep = [p for p, d, before in zip(points, directions, directions[-1:] + directions[:-1])
            if d != before]
    return np.array(keep, dtype=np.int64)


def _signed_area(loop: np.ndarray) -> float:
    """Shoelace area; positive for outer outlines (see ``_boundary_edges``)."""
    x, y = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _contains(loop: np.ndarray, point: Tuple[float, float]) -> bool:
    """Even-odd point-in-polygon test (the point is never on the outline)."""
    x, y = point
    x0, y0 = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    spans = (y0 > y) != (y1 > y)
    with np.errstate(divide='ignore', invalid='ignore'):
        crossing = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(spans & (x < crossing)) % 2)


def _pixel_inside_hole_outline(hole: np.ndarray) -> Tuple[float, float]:
    """Centre of an object pixel bordering the hole (right of its first edge)."""
    (x0, y0), (x1, y1) = hole[0], hole[1]
    dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
    return x0 + 0.5 * dx - 0.5 * dy, y0 + 0.5 * dy + 0.5 * dx


def _bridge(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Splice a hole into its outline through a zero-width slit.

    COCO unions the polygons of an object, so a hole cannot be a polygon of
    its own. The slit is walked once each way, so its crossings cancel under
    the even-odd fill used by pycocotools.
    """
    distances = ((outer[:, None, :] - hole[None, :, :])**2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
    return np.concatenate([outer[:i + 1], hole[j:], hole[:j + 1], outer[i:]])


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Convert a bool mask to COCO polygons that rasterise back to it exactly.

    One polygon per 4-connected component, with its holes spliced in.

    Args:
        mask: ``(H, W)`` bool map.

    Returns:
        Flat ``[x0, y0, x1, y1, ...]`` lists in pixel-corner coordinates.
    """
    loops = _trace_loops(mask)
    outers = [loop for loop in loops if _signed_area(loop) > 0]
    outer_areas = [_signed_area(loop) for loop in outers]
    holes_of: List[List[np.ndarray]] = [[] for _ in outers]
    for hole in (loop for loop in loops if _signed_area(loop) < 0):
        point = _pixel_inside_hole_outline(hole)
        owners = [k for k, outer in enumerate(outers) if _contains(outer, point)]
        holes_of[min(owners, key=lambda k: outer_areas[k])].append(hole)
    polygons = []
    for outer, holes in zip(outers, holes_of):
        for hole in holes:
            outer = _bridge(outer, hole)
        polygons.append([float(v) for v in outer.reshape(-1)])
    return polygons


def tight_bbox(mask: np.ndarray) -> List[float]:
    """COCO ``[x, y, w, h]`` box of the pixels of ``mask`` (pixel corners)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]),
            float(rows[-1] + 1 - rows[0])]


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------
def _prepare_task_dir(path: Path) -> Path:
    """Create an empty task folder, replacing one that this module made.

    Raises:
        FileExistsError: If ``path`` holds files that this module did not
            write (for example a real data set).
    """
    if path.exists():
        if not (path / MARKER_FILE).is_file() and any(path.iterdir()):
            raise FileExistsError(f'{path} exists and was not made by this generator; '
                                  'choose another --out')
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER_FILE).write_text('made by sar_backbones.datasets.generate\n')
    return path


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


def _check_counts(**counts: int) -> None:
    """Reject counts below one: empty splits break the loaders."""
    for name, value in counts.items():
        if int(value) < 1:
            raise ValueError(f'{name} must be at least 1, got {value}')


def _check_size_range(size_range: Sequence[int]) -> Tuple[int, int]:
    """Validate a ``(min, max)`` side range."""
    low, high = int(size_range[0]), int(size_range[-1])
    if not 32 <= low <= high:
        raise ValueError(f'image sides must satisfy 32 <= min <= max, got {size_range}')
    return low, high


def generate_imagenet(out_dir: str | Path, num_train_per_class: int = DEFAULT_CLS_TRAIN_PER_CLASS,
                      num_val_per_class: int = DEFAULT_CLS_VAL_PER_CLASS,
                      image_size: int = DEFAULT_CLS_SIZE, seed: int = DEFAULT_SEED) -> dict:
    """Write an ImageNet-style classification set to ``out_dir/imagenet``.

    Layout: ``{train,val}/<class>/<class>_<i>.JPEG``, ``meta/{train,val}.txt``
    with lines ``<class>/<file> <label>`` relative to the split folder (what
    mmpretrain's ``ImageNet(split=...)`` reads), and ``classes.txt``.

    Args:
        out_dir: Output root.
        num_train_per_class: Training images per class.
        num_val_per_class: Validation images per class.
        image_size: Side of the square images.
        seed: Base seed.

    Returns:
        The task's entry of ``dataset_info.json``.
    """
    _check_counts(num_train_per_class=num_train_per_class, num_val_per_class=num_val_per_class)
    if image_size < 32:
        raise ValueError(f'image_size must be at least 32, got {image_size}')
    root = _prepare_task_dir(Path(out_dir) / 'imagenet')
    (root / 'meta').mkdir()
    (root / 'classes.txt').write_text(''.join(f'{name}\n' for name in CLASSES))
    per_class = {'train': num_train_per_class, 'val': num_val_per_class}
    for split in SPLITS:
        lines = []
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class[split]):
                relative = f'{name}/{name}_{index:05d}.JPEG'
                scene = classification_scene(seed, split, label, index, image_size)
                (root / split / relative).write_bytes(_encode_jpeg(scene.image))
                lines.append(f'{relative} {label}\n')
        (root / 'meta' / f'{split}.txt').write_text(''.join(lines))
    info = dict(root='imagenet', seed=int(seed), image_size=[int(image_size)] * 2,
                per_class={s: int(n) for s, n in per_class.items()},
                num_images={s: int(n) * len(CLASSES) for s, n in per_class.items()})
    _update_info(out_dir, 'imagenet', info)
    return info


class _CocoWriter:
    """Accumulates one COCO split and writes its images as they come."""

    def __init__(self, root: Path, split: str) -> None:
        self.split = split
        self.image_dir = root / f'{split}2017'
        self.image_dir.mkdir(parents=True)
        self.json_path = root / 'annotations' / f'instances_{split}2017.json'
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.images: List[dict] = []
        self.annotations: List[dict] = []

    def add(self, image_id: int, scene: Scene, jpeg: bytes) -> None:
        """Write one image and record its objects."""
        file_name = f'{image_id:012d}.jpg'
        (self.image_dir / file_name).write_bytes(jpeg)
        self.images.append(dict(id=image_id, file_name=file_name, height=scene.height,
                                width=scene.width))
        for index, label in enumerate(scene.labels):
            mask = scene.object_mask(index)
            self.annotations.append(dict(
                id=len(self.annotations) + 1, image_id=image_id, category_id=label + 1,
                bbox=tight_bbox(mask), area=float(mask.sum()), iscrowd=0,
                segmentation=mask_to_polygons(mask)))

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
        self.json_path.write_text(json.dumps(content, separators=(',', ':')))
        return dict(images=len(self.images), annotations=len(self.annotations))


class _VocWriter:
    """Writes one VOC segmentation split."""

    def __init__(self, root: Path, split: str, ignore_radius: int) -> None:
        self.split = split
        self.ignore_radius = ignore_radius
        self.image_dir = root / 'JPEGImages'
        self.label_dir = root / 'SegmentationClass'
        self.list_path = root / 'ImageSets' / 'Segmentation' / f'{split}.txt'
        for folder in (self.image_dir, self.label_dir, self.list_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.names: List[str] = []

    def add(self, image_id: int, scene: Scene, jpeg: bytes) -> None:
        """Write one image and its label PNG."""
        name = f'{image_id:012d}'
        (self.image_dir / f'{name}.jpg').write_bytes(jpeg)
        (self.label_dir / f'{name}.png').write_bytes(
            _encode_label_png(scene.semantic_map(self.ignore_radius)))
        self.names.append(name)

    def close(self) -> dict:
        """Write the split's image list; return its counts."""
        self.list_path.write_text(''.join(f'{name}\n' for name in self.names))
        return dict(images=len(self.names))


def _write_scene_sets(out_dir: Path, tasks: Sequence[str], num_train: int, num_val: int,
                      image_size: Tuple[int, int], max_objects: int, seed: int,
                      ignore_radius: int) -> Dict[str, dict]:
    """Render each scene once and hand it to every requested format."""
    roots = {}
    if 'coco' in tasks:
        roots['coco'] = _prepare_task_dir(out_dir / 'coco')
    if 'voc' in tasks:
        roots['voc'] = _prepare_task_dir(out_dir / 'VOCdevkit') / 'VOC2012'
    counts: Dict[str, dict] = {task: {} for task in roots}
    for split, total in (('train', num_train), ('val', num_val)):
        writers = []
        if 'coco' in roots:
            writers.append(('coco', _CocoWriter(roots['coco'], split)))
        if 'voc' in roots:
            writers.append(('voc', _VocWriter(roots['voc'], split, ignore_radius)))
        objects = 0
        for index in range(total):
            scene = detection_scene(seed, split, index, image_size, max_objects)
            objects += len(scene.labels)
            jpeg = _encode_jpeg(scene.image)
            for _, writer in writers:
                writer.add(_ID_OFFSETS[split] + index, scene, jpeg)
        for task, writer in writers:
            counts[task][split] = dict(writer.close(), objects=objects)
    infos = {}
    for task in roots:
        infos[task] = dict(root='coco' if task == 'coco' else 'VOCdevkit/VOC2012', seed=int(seed),
                           image_size_range=list(image_size), max_objects=int(max_objects),
                           splits=counts[task])
        if task == 'voc':
            infos[task]['ignore_radius'] = int(ignore_radius)
        _update_info(out_dir, task, infos[task])
    return infos


def generate_coco(out_dir: str | Path, num_train: int = DEFAULT_NUM_TRAIN,
                  num_val: int = DEFAULT_NUM_VAL,
                  image_size: Tuple[int, int] = DEFAULT_SCENE_SIZE,
                  max_objects: int = DEFAULT_MAX_OBJECTS, seed: int = DEFAULT_SEED) -> dict:
    """Write a COCO-format detection / instance segmentation set to ``out_dir/coco``.

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
    _check_counts(num_train=num_train, num_val=num_val, max_objects=max_objects)
    return _write_scene_sets(Path(out_dir), ['coco'], num_train, num_val,
                             _check_size_range(image_size), max_objects, seed, 0)['coco']


def generate_voc(out_dir: str | Path, num_train: int = DEFAULT_NUM_TRAIN,
                 num_val: int = DEFAULT_NUM_VAL,
                 image_size: Tuple[int, int] = DEFAULT_SCENE_SIZE,
                 max_objects: int = DEFAULT_MAX_OBJECTS, seed: int = DEFAULT_SEED,
                 ignore_radius: int = DEFAULT_IGNORE_RADIUS) -> dict:
    """Write a VOC-format semantic segmentation set to ``out_dir/VOCdevkit/VOC2012``.

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
    _check_counts(num_train=num_train, num_val=num_val, max_objects=max_objects)
    if not 0 <= ignore_radius <= 2:
        # Scenes guarantee object cores only two pixels deep.
        raise ValueError(f'ignore_radius must be in [0, 2], got {ignore_radius}')
    return _write_scene_sets(Path(out_dir), ['voc'], num_train, num_val,
                             _check_size_range(image_size), max_objects, seed,
                             ignore_radius)['voc']


def generate_all(out_dir: str | Path, tasks: Iterable[str] = ('imagenet', 'coco', 'voc'),
                 num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                 image_size: Tuple[int, int] = DEFAULT_SCENE_SIZE,
                 cls_num_train: int = DEFAULT_CLS_TRAIN_PER_CLASS,
                 cls_num_val: int = DEFAULT_CLS_VAL_PER_CLASS,
                 cls_image_size: int = DEFAULT_CLS_SIZE,
                 max_objects: int = DEFAULT_MAX_OBJECTS, seed: int = DEFAULT_SEED,
                 ignore_radius: int = DEFAULT_IGNORE_RADIUS) -> dict:
    """Write the requested data sets under ``out_dir``.

    COCO and VOC are rendered in one pass over the same scenes.

    Args:
        out_dir: Output root; ``dataset_info.json`` goes there.
        tasks: Any of ``'imagenet'``, ``'coco'``, ``'voc'``.
        num_train: COCO / VOC training images.
        num_val: COCO / VOC validation images.
        image_size: COCO / VOC inclusive ``(min, max)`` side range.
        cls_num_train: ImageNet training images per class.
        cls_num_val: ImageNet validation images per class.
        cls_image_size: ImageNet image side.
        max_objects: Most objects per COCO / VOC image.
        seed: Base seed.
        ignore_radius: VOC ignore band half-width.

    Returns:
        The content of ``dataset_info.json``.
    """
    tasks = list(dict.fromkeys(tasks))
    unknown = set(tasks) - {'imagenet', 'coco', 'voc'}
    if unknown:
        raise ValueError(f'unknown tasks {sorted(unknown)}')
    out_dir = Path(out_dir)
    if 'imagenet' in tasks:
        generate_imagenet(out_dir, cls_num_train, cls_num_val, cls_image_size, seed)
    scene_tasks = [task for task in tasks if task in ('coco', 'voc')]
    if scene_tasks:
        _check_counts(num_train=num_train, num_val=num_val, max_objects=max_objects)
        if not 0 <= ignore_radius <= 2:
            raise ValueError(f'ignore_radius must be in [0, 2], got {ignore_radius}')
        _write_scene_sets(out_dir, scene_tasks, num_train, num_val, _check_size_range(image_size),
                          max_objects, seed, ignore_radius)
    return json.loads((out_dir / INFO_FILE).read_text())


def _update_info(out_dir: str | Path, task: str, entry: dict) -> None:
    """Merge one task's entry into ``dataset_info.json`` (sorted, so stable)."""
    path = Path(out_dir) / INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    if info.get('generator') != GENERATOR:
        info = {}
    info.update(generator=GENERATOR, classes=list(CLASSES), seg_classes=list(SEG_CLASSES),
                palette=PALETTE, seg_palette=SEG_PALETTE, ignore_index=IGNORE_INDEX,
                class_hues=list(CLASS_HUES))
    info.setdefault('tasks', {})[task] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + '\n')


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog='sar-make-data', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', default='data/demo', help='output root')
    parser.add_argument('--task', nargs='+', default=['all'],
                        choices=['all', 'imagenet', 'coco', 'voc'], help='data sets to write')
    parser.add_argument('--num-train', type=int, default=DEFAULT_NUM_TRAIN,
                        help='COCO / VOC training images')
    parser.add_argument('--num-val', type=int, default=DEFAULT_NUM_VAL,
                        help='COCO / VOC validation images')
    parser.add_argument('--image-size', type=int, nargs='+', default=list(DEFAULT_SCENE_SIZE),
                        metavar='SIDE', help='COCO / VOC side: one value, or MIN MAX for '
                        'sides drawn per image')
    parser.add_argument('--cls-num-train', type=int, default=DEFAULT_CLS_TRAIN_PER_CLASS,
                        help='ImageNet training images per class')
    parser.add_argument('--cls-num-val', type=int, default=DEFAULT_CLS_VAL_PER_CLASS,
                        help='ImageNet validation images per class')
    parser.add_argument('--cls-image-size', type=int, default=DEFAULT_CLS_SIZE,
                        help='ImageNet image side')
    parser.add_argument('--max-objects', type=int, default=DEFAULT_MAX_OBJECTS,
                        help='most objects per COCO / VOC image')
    parser.add_argument('--ignore-radius', type=int, default=DEFAULT_IGNORE_RADIUS,
                        choices=[0, 1, 2], help='VOC: half-width of the 255 boundary band')
    parser.add_argument('--seed', type=int, default=DEFAULT_SEED, help='base random seed (>= 0)')
    args = parser.parse_args(argv)
    if len(args.image_size) > 2:
        parser.error('--image-size takes one or two values')
    if args.seed < 0:
        parser.error('--seed must be non-negative')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``sar-make-data``).

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        0 on success, 2 when the arguments or the output folder are unusable.
    """
    args = _parse_args(argv)
    tasks = ['imagenet', 'coco', 'voc'] if 'all' in args.task else args.task
    start = time.perf_counter()
    try:
        info = generate_all(args.out, tasks, args.num_train, args.num_val,
                            (args.image_size[0], args.image_size[-1]), args.cls_num_train,
                            args.cls_num_val, args.cls_image_size, args.max_objects, args.seed,
                            args.ignore_radius)
    except (ValueError, FileExistsError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    for task in tasks:
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
