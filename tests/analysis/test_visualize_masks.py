"""tools/analysis/visualize_masks.py: overlays follow the masks, for presets and task configs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sar_backbones.analysis.flops_stats import (image_to_tensor, list_images, load_image,
                                                resize_image)
from sar_backbones.analysis.mask_vis import collect_masks, overlay, stage_group_weights
from tools.analysis.model_builders import build_preset_backbone
from .tool_helpers import FASTER_RCNN, load_tool

visualize_masks = load_tool('visualize_masks')


def test_collect_masks_matches_the_model_masks():
    model = build_preset_backbone('sar-resnet18-g2s2a2b1')
    x = torch.randn(1, 3, 64, 96)
    collected = collect_masks(model, x, rate=0.5, seed=3)
    assert model._mask_override is None  # restored
    assert len(collected['masks']) == model.num_masked_blocks
    assert collected['stage_of_block'] == [0, 1, 2]
    for mask, pixel_mask in zip(collected['masks'], collected['pixel_masks']):
        assert pixel_mask.shape == (2, 64, 96)
        # nearest upsampling keeps the share of selected pixels close to the patch share
        assert float(pixel_mask.mean()) == pytest.approx(float(mask.float().mean()), abs=0.1)
    assert collected['rates'] == pytest.approx([0.5, 0.5, 0.5], abs=0.02)


def test_overlay_differs_exactly_where_masks_are_set():
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    weight = np.zeros((8, 8), dtype=np.float32)
    weight[:4] = 1
    out = overlay(image, weight, colour=(255, 0, 0))
    assert (out[:4] != out[4:]).any(axis=-1).all()
    assert (out[4:] == out[4, 0]).all() and (out[:4] == out[0, 0]).all()
    assert out[0, 0, 0] > out[4, 0, 0]  # refined pixels stay bright, the rest is dimmed


def test_tool_on_a_preset_writes_overlays_that_follow_the_masks(tmp_path, tiny_imagenet):
    out_dir = tmp_path / 'vis'
    index = visualize_masks.main([
        '--preset', 'sar-resnet18-g2s2a2b1', '--mask-rate', '0.5', '--seed', '1',
        '--images', str(tiny_imagenet / 'val'), '--num-images', '2', '--shape', '64',
        '--out-dir', str(out_dir)])
    assert json.loads((out_dir / 'masks.json').read_text()) == index
    assert len(index['images']) == 2
    stem, entry = sorted(index['images'].items())[0]
    assert len(entry['overlays']) == 3 * 2  # 3 stages x 2 groups
    assert (out_dir / f'{stem}_masks.png').stat().st_size > 0
    assert entry['activation_rate'] == pytest.approx(0.5, abs=0.02)

    # Recompute the masks of the first image and compare with the saved overlay.
    path = list_images(str(tiny_imagenet / 'val'), 2)[0]
    picture = resize_image(load_image(path), (64, 64))
    model = build_preset_backbone('sar-resnet18-g2s2a2b1')
    collected = collect_masks(model, image_to_tensor(picture), rate=0.5, seed=1)
    weights = stage_group_weights(collected)
    saved = np.asarray(Image.open(out_dir / f'{stem}_stage1_group1.png'))
    expected = overlay(picture, weights[(0, 0)])
    assert np.array_equal(saved, expected)
    selected = weights[(0, 0)] > 0.5
    assert selected.any() and (~selected).any()
    changed = np.abs(saved.astype(int) - picture.astype(int)).sum(-1)
    # Unrefined pixels are dimmed far more than refined ones.
    assert changed[~selected].mean() > changed[selected].mean()


def test_tool_per_block_on_a_detector_config(tmp_path, tiny_imagenet):
    out_dir = tmp_path / 'det'
    index = visualize_masks.main([
        str(FASTER_RCNN), '--mask-rate', '0.3', '--images', str(tiny_imagenet / 'val'),
        '--num-images', '1', '--shape', '96', '128', '--level', 'block', '--no-figure',
        '--out-dir', str(out_dir)])
    assert index['task'] == 'detector'
    entry = next(iter(index['images'].values()))
    # depth 50: 2 + 3 + 5 refine blocks, 2 groups each
    assert len(entry['overlays']) == 10 * 2
    assert 'figure' not in entry
    first = np.asarray(Image.open(entry['overlays'][0]))
    # mmdet-style keep-ratio resize: a square 64x64 picture fits 96x128 as 96x96
    assert first.shape[:2] == (96, 96)
    assert entry['input_shape'] == [3, 96, 96]
