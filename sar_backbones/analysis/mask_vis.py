"""Overlays of the regions a SAR-ResNet refines (paper Fig. 6 and 7).

Each refine block of stage ``s`` picks, per channel group ``g``, a ``Kh x Kw``
patch mask on its feature map. :func:`collect_masks` runs the backbone on one
image and maps every mask to image pixels exactly as the model applies it
(patch -> feature pixels with the model's own nearest rule, feature pixels ->
image pixels by the stage stride, i.e. proportionally). :func:`overlay` dims the
unselected pixels and tints the selected ones; per stage, a pixel's weight is
the fraction of the stage's blocks that refine it.
"""
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..engine.hooks import get_sar_backbone
from ..models.layers import expand_mask
from ..models.layers.masking import nearest_source_index

# One tint per group (RGB), cycling for G > 4.
GROUP_COLOURS = ((255, 64, 32), (32, 160, 255), (64, 220, 64), (240, 200, 0))


def collect_masks(model: nn.Module, x: Tensor, image_size: Optional[Tuple[int, int]] = None,
                  rate: Optional[float] = None, seed: int = 0) -> Dict[str, object]:
    """Masks of one image ``x`` (1, C, H, W) at feature and at image resolution.

    Args:
        model: A SAR backbone or a task model holding one.
        x: The network input.
        image_size: ``(H, W)`` of the picture the overlay is drawn on, when the
            input is padded (only its top-left ``image_size`` part is the
            picture); defaults to the input size.
        rate: Draw random masks at this rate instead of the learned ones
            (``set_mask_override``); None keeps the model's own masks.

    Returns:
        dict: ``masks`` (list of ``(G, Kh, Kw)`` bool, one per masked block),
        ``pixel_masks`` (list of ``(G, H, W)`` float at image resolution),
        ``stage_of_block`` (stage index of each block), ``rates``
        (per block), ``feature_sizes`` (refine feature size per stage).
    """
    backbone = get_sar_backbone(model)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f'collect_masks takes one image (1, C, H, W), got {tuple(x.shape)}')
    feature_sizes: List[Tuple[int, int]] = []

    def record(module, args, output) -> None:
        feature_sizes.append(tuple(args[1].shape[-2:]))  # fusion_gate(x_base, x_refine)

    handles = [stage.fusion_gate.register_forward_hook(record) for stage in backbone.sar_stages]
    try:
        with backbone.temporary_settings(training=False, mask_rate=rate, seed=seed), \
                torch.no_grad():
            param = next(backbone.parameters())
            backbone(x.to(param.device, param.dtype))
            masks = [m[0].detach().cpu() for m in backbone.get_masks()]
            rates = backbone.get_activation_rates()[0].tolist()
    finally:
        for handle in handles:
            handle.remove()
    stage_of_block = []
    for stage_index, cols in enumerate(backbone.stage_block_slices()):
        stage_of_block += [stage_index] * (cols.stop - cols.start)
    in_h, in_w = x.shape[-2:]
    img_h, img_w = image_size or (in_h, in_w)
    pixel_masks = []
    for mask, stage_index in zip(masks, stage_of_block):
        fh, fw = feature_sizes[stage_index]
        feature_mask = expand_mask(mask.float().unsqueeze(0), (fh, fw))[0]  # (G, fh, fw)
        # Input pixel y lies in feature pixel (y * fh) // H: the stride of the stage.
        rows = nearest_source_index(in_h, fh, feature_mask.device)[:img_h]
        cols = nearest_source_index(in_w, fw, feature_mask.device)[:img_w]
        pixel_masks.append(feature_mask.index_select(1, rows).index_select(2, cols))
    return {'masks': [m.bool() for m in masks], 'pixel_masks': pixel_masks,
            'stage_of_block': stage_of_block, 'rates': rates, 'feature_sizes': feature_sizes}


def stage_group_weights(collected: Dict[str, object]) -> Dict[Tuple[int, int], np.ndarray]:
    """``{(stage, group): (H, W) weight}``: fraction of the stage's blocks refining each pixel."""
    sums: Dict[Tuple[int, int], np.ndarray] = {}
    counts: Dict[int, int] = {}
    for pixel_mask, stage in zip(collected['pixel_masks'], collected['stage_of_block']):
        counts[stage] = counts.get(stage, 0) + 1
        for group in range(pixel_mask.shape[0]):
            key = (stage, group)
            value = pixel_mask[group].numpy().astype(np.float32)
            sums[key] = sums[key] + value if key in sums else value.copy()
    return {key: value / counts[key[0]] for key, value in sums.items()}


def overlay(image: np.ndarray, weight: np.ndarray, colour: Sequence[int] = GROUP_COLOURS[0],
            dim: float = 0.3, tint: float = 0.35) -> np.ndarray:
    """Dim unselected pixels and tint selected ones.

    ``out = image * (dim + (1 - dim) * w) * (1 - tint * w) + colour * tint * w`` for
    the weight ``w`` in [0, 1] (1: refined by every block).
    """
    if image.shape[:2] != weight.shape:
        raise ValueError(f'image {image.shape[:2]} and weight {weight.shape} differ in size')
    w = np.clip(weight.astype(np.float32), 0, 1)[..., None]
    img = image.astype(np.float32)
    out = img * (dim + (1 - dim) * w) * (1 - tint * w) + np.asarray(colour, np.float32) * tint * w
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def draw_patch_grid(image: np.ndarray, mask: Tensor, colour=(255, 255, 255)) -> np.ndarray:
    """Outline the selected patches of a ``(Kh, Kw)`` mask on an image (proportional mapping)."""
    out = image.copy()
    h, w = out.shape[:2]
    kh, kw = mask.shape
    for i in range(kh):
        for j in range(kw):
            if not bool(mask[i, j]):
                continue
            y0, y1 = (i * h) // kh, min(((i + 1) * h) // kh, h) - 1
            x0, x1 = (j * w) // kw, min(((j + 1) * w) // kw, w) - 1
            out[y0, x0:x1 + 1] = colour
            out[y1, x0:x1 + 1] = colour
            out[y0:y1 + 1, x0] = colour
            out[y0:y1 + 1, x1] = colour
    return out


def save_png(array: np.ndarray, path: str) -> str:
    from PIL import Image
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def render_figure(image: np.ndarray, collected: Dict[str, object], path: str,
                  title: str = '', level: str = 'stage') -> str:
    """A matplotlib figure: the image, then one overlay per stage (or block) and group."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups = collected['pixel_masks'][0].shape[0]
    if level == 'stage':
        weights = stage_group_weights(collected)
        stages = sorted({s for s, _ in weights})
        rows = [(f'stage {s + 1}', [weights[(s, g)] for g in range(groups)]) for s in stages]
        stage_rates = {}
        for rate, stage in zip(collected['rates'], collected['stage_of_block']):
            stage_rates.setdefault(stage, []).append(rate)
        labels = [f'stage {s + 1} (rate {np.mean(stage_rates[s]):.2f})' for s in stages]
    elif level == 'block':
        rows = []
        labels = []
        per_stage: Dict[int, int] = {}
        for pixel_mask, stage, rate in zip(collected['pixel_masks'], collected['stage_of_block'],
                                           collected['rates']):
            per_stage[stage] = per_stage.get(stage, 0) + 1
            rows.append(('', [pixel_mask[g].numpy() for g in range(groups)]))
            labels.append(f'stage {stage + 1} block {per_stage[stage]} (rate {rate:.2f})')
    else:
        raise ValueError(f"level must be 'stage' or 'block', got {level!r}")
    h, w = image.shape[:2]
    fig, axes = plt.subplots(len(rows), groups + 1,
                             figsize=((groups + 1) * 2.6 * w / max(h, w) + 0.4,
                                      len(rows) * 2.6 * h / max(h, w) + 0.6),
                             squeeze=False)
    for r, ((_, weights), label) in enumerate(zip(rows, labels)):
        axes[r][0].imshow(image)
        axes[r][0].set_ylabel(label, fontsize=8)
        for g, weight in enumerate(weights):
            axes[r][g + 1].imshow(overlay(image, weight, GROUP_COLOURS[g % len(GROUP_COLOURS)]))
            if r == 0:
                axes[r][g + 1].set_title(f'group {g + 1}', fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title('input', fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_overlays(image: np.ndarray, collected: Dict[str, object], out_dir: str, stem: str,
                  level: str = 'stage', figure: bool = True, title: str = '') -> Dict[str, object]:
    """Write one PNG per stage (or block) and group, plus the composite figure.

    Returns the written paths and the image's rates (for a JSON index).
    """
    files: List[str] = []
    groups = collected['pixel_masks'][0].shape[0]
    if level == 'stage':
        for (stage, group), weight in sorted(stage_group_weights(collected).items()):
            colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
            name = f'{stem}_stage{stage + 1}_group{group + 1}.png'
            files.append(save_png(overlay(image, weight, colour), osp.join(out_dir, name)))
    else:
        per_stage: Dict[int, int] = {}
        for pixel_mask, stage in zip(collected['pixel_masks'], collected['stage_of_block']):
            per_stage[stage] = per_stage.get(stage, 0) + 1
            for group in range(groups):
                colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
                files.append(save_png(
                    overlay(image, pixel_mask[group].numpy(), colour),
                    osp.join(out_dir, f'{stem}_stage{stage + 1}_block{per_stage[stage]}'
                                      f'_group{group + 1}.png')))
    entry: Dict[str, object] = {'overlays': files, 'block_rates': collected['rates'],
                                'activation_rate': float(np.mean(collected['rates']))}
    if figure:
        entry['figure'] = render_figure(image, collected, osp.join(out_dir, f'{stem}_masks.png'),
                                        title=title, level=level)
    return entry
