"""Pieces of the demo's report (``tools/demo.py``): costs, tables, mask overlays.

* :func:`resnet_baseline_macs` counts a plain ResNet with the same depth,
  widths, stem, strides and dilations as a SAR-ResNet, in the paper's MAC
  convention (:func:`sar_backbones.analysis.count_macs`).
* :func:`backbone_costs` puts a SAR backbone's effective MACs at measured
  activation rates next to its all-selected cost and that ResNet.
* :func:`results_markdown` formats the demo's results table.
* :func:`stage_masks`, :func:`overlay_mask` and :func:`mask_figure` draw
  which patches each SAR stage chose to refine.
"""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from .complexity import count_macs, find_sar_backbone, model_complexity

# Colour of refined patches in the overlays (RGB) and how strongly unrefined
# patches are dimmed: the eye should find the selected regions at once.
REFINE_COLOUR = (255, 64, 32)
TINT_ALPHA = 0.45
DIM_FACTOR = 0.35


def build_plain_resnet(backbone: nn.Module) -> nn.Module:
    """A plain (mmseg) ResNet shaped like a SAR-ResNet backbone.

    Same depth, stem (plain or deep), stem and stage widths, strides and
    dilations, so that both are counted at the same feature resolutions (for
    the default strides this is torchvision's ResNet trunk).

    Args:
        backbone (nn.Module): A :class:`SARResNet` or a model holding one.

    Returns:
        nn.Module: The ResNet, in eval mode.
    """
    # mmseg's ResNet is the one whose BasicBlock accepts dilation (the OS8
    # segmentation setting); torchvision's refuses it.
    from mmseg.models.backbones import ResNet

    sar = find_sar_backbone(backbone)
    stem = sar.stem[-3].out_channels if sar.deep_stem else sar.conv1.out_channels
    block, _ = sar.arch_settings[sar.depth]
    resnet = ResNet(
        depth=sar.depth,
        in_channels=sar.in_channels,
        stem_channels=stem,
        base_channels=sar.stage_channels[0] // block.expansion,
        strides=sar.strides,
        dilations=sar.dilations,
        deep_stem=sar.deep_stem,
        out_indices=(3, ))
    # mmseg's ``ResNet.train`` returns None, so no ``return resnet.eval()``.
    resnet.eval()
    return resnet


def resnet_baseline_macs(backbone: nn.Module, input_shape: Sequence[int]) -> Dict[str, float]:
    """MACs and parameters of the plain ResNet matching ``backbone``.

    Args:
        backbone (nn.Module): A :class:`SARResNet` or a model holding one.
        input_shape (Sequence[int]): ``(C, H, W)`` of one image.

    Returns:
        dict: ``flops`` (MACs of one image) and ``params``.
    """
    resnet = build_plain_resnet(backbone)
    macs = sum(count_macs(resnet, input_shape).values())
    return dict(flops=float(macs), params=float(sum(p.numel() for p in resnet.parameters())))


def backbone_costs(backbone: nn.Module, input_shape: Sequence[int],
                   block_rates: Sequence[float]) -> Dict[str, float]:
    """Backbone GMACs at measured rates, with everything selected, and of ResNet.

    Args:
        backbone (nn.Module): A :class:`SARResNet` or a model holding one.
        input_shape (Sequence[int]): ``(C, H, W)`` of one image.
        block_rates (Sequence[float]): Mean activation rate of every masked
            block (the columns of ``get_activation_rates()``).

    Returns:
        dict: ``gmacs`` (at the rates), ``gmacs_all_selected`` (rate 1),
        ``gmacs_resnet``, the relative savings ``saving_vs_all_selected`` and
        ``saving_vs_resnet`` (fractions), ``params_m`` and ``params_resnet_m``.
    """
    sar = model_complexity(backbone, input_shape, activation_rate=list(block_rates))
    resnet = resnet_baseline_macs(backbone, input_shape)
    return dict(
        gmacs=sar['flops'] / 1e9,
        gmacs_all_selected=sar['flops_dense'] / 1e9,
        gmacs_resnet=resnet['flops'] / 1e9,
        saving_vs_all_selected=1 - sar['flops'] / sar['flops_dense'],
        saving_vs_resnet=1 - sar['flops'] / resnet['flops'],
        params_m=sar['params'] / 1e6,
        params_resnet_m=resnet['params'] / 1e6)


# --------------------------------------------------------------------- table
_COLUMNS = (
    ('Task', 'task'),
    ('Model (input)', 'model'),
    ('Metric', 'metric'),
    ('Untrained', 'untrained'),
    ('Trained', 'trained'),
    ('Act. rate (target)', 'rate'),
    ('Backbone GMACs', 'gmacs'),
    ('All selected', 'gmacs_all_selected'),
    ('Plain ResNet', 'gmacs_resnet'),
    ('Saving vs ResNet', 'saving_vs_resnet'),
)


def _row_cells(row: dict) -> Dict[str, str]:
    size = 'x'.join(str(s) for s in row['input_shape'][1:])
    return dict(
        task=row['task'],
        model=f"{row['model']} ({size})",
        metric=row['metric_name'],
        untrained=f"{row['untrained']:.1f}",
        trained=f"**{row['trained']:.1f}**",
        rate=f"{row['act_rate']:.2f} ({row['target_rate']:.2f})",
        gmacs=f"{row['gmacs']:.3f}",
        gmacs_all_selected=f"{row['gmacs_all_selected']:.3f}",
        gmacs_resnet=f"{row['gmacs_resnet']:.3f}",
        saving_vs_resnet=f"{100 * row['saving_vs_resnet']:.1f}%")


def results_markdown(rows: List[dict]) -> str:
    """The results table in Markdown, one row per task.

    Args:
        rows (list[dict]): Per task: ``task``, ``model``, ``input_shape``,
            ``metric_name``, ``untrained``, ``trained``, ``act_rate``,
            ``target_rate`` and the keys of :func:`backbone_costs`.

    Returns:
        str: A Markdown table (with a trailing newline).
    """
    header = '| ' + ' | '.join(title for title, _ in _COLUMNS) + ' |'
    rule = '|' + '|'.join(' --- ' for _ in _COLUMNS) + '|'
    lines = [header, rule]
    for row in rows:
        cells = _row_cells(row)
        lines.append('| ' + ' | '.join(cells[key] for _, key in _COLUMNS) + ' |')
    return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------- masks
def stage_masks(backbone: nn.Module) -> List[Tensor]:
    """Per SAR stage, the share of refined channel groups of each patch.

    Reads the masks of the last forward pass; the blocks of a stage (and the
    ``G`` groups of each) are averaged, so a value of 0.5 means half the
    channel groups refine that patch.

    Args:
        backbone (nn.Module): A :class:`SARResNet` (or a model holding one)
            after a forward pass.

    Returns:
        list[Tensor]: One ``(B, Kh, Kw)`` float tensor in [0, 1] per stage.
    """
    sar = find_sar_backbone(backbone)
    masks = sar.get_masks()
    out = []
    for cols in sar.stage_block_slices():
        stacked = torch.stack([m.float() for m in masks[cols]], dim=0)  # (n, B, G, Kh, Kw)
        out.append(stacked.mean(dim=(0, 2)).cpu())
    return out


def overlay_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tint the refined patches of an image and dim the others.

    Args:
        image (np.ndarray): ``(H, W, 3)`` uint8 RGB image.
        mask (np.ndarray): ``(Kh, Kw)`` patch mask in [0, 1], stretched over
            the image with nearest-neighbour sampling (as the model does).

    Returns:
        np.ndarray: ``(H, W, 3)`` uint8 RGB overlay.
    """
    height, width = image.shape[:2]
    rows = np.minimum((np.arange(height) * mask.shape[0]) // height, mask.shape[0] - 1)
    cols = np.minimum((np.arange(width) * mask.shape[1]) // width, mask.shape[1] - 1)
    weight = mask[rows][:, cols][..., None].astype(np.float32)
    pixels = image.astype(np.float32)
    tinted = (1 - TINT_ALPHA) * pixels + TINT_ALPHA * np.array(REFINE_COLOUR, np.float32)
    dimmed = DIM_FACTOR * pixels
    out = weight * tinted + (1 - weight) * dimmed
    return np.clip(out, 0, 255).astype(np.uint8)


def mask_figure(images: Sequence[np.ndarray], masks: Sequence[Sequence[np.ndarray]],
                title: str, scale: int = 2, column_titles: Optional[Sequence[str]] = None
                ) -> Image.Image:
    """A grid: one row per image, its input and one overlay per SAR stage.

    Args:
        images (Sequence[np.ndarray]): ``(H, W, 3)`` uint8 RGB images.
        masks (Sequence[Sequence[np.ndarray]]): Per image, one ``(Kh, Kw)``
            mask per stage (see :func:`stage_masks`).
        title (str): Text above the grid.
        scale (int): Upscaling of every tile (nearest), for small images.
        column_titles (Sequence[str], optional): Defaults to ``input``,
            ``stage 1`` ... with each stage's mean rate over the shown images.

    Returns:
        PIL.Image.Image: The figure.
    """
    num_stages = len(masks[0])
    if column_titles is None:
        column_titles = ['input'] + [
            f'stage {s + 1}: {np.mean([m[s].mean() for m in masks]):.2f}'
            for s in range(num_stages)]
    tile_h = max(img.shape[0] for img in images) * scale
    tile_w = max(img.shape[1] for img in images) * scale
    pad, head, caption = 4, 16, 14
    width = (num_stages + 1) * (tile_w + pad) + pad
    height = head + caption + len(images) * (tile_h + pad) + pad
    figure = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    draw.text((pad, 2), title, fill=(0, 0, 0))
    for col, text in enumerate(column_titles):
        draw.text((pad + col * (tile_w + pad), head), text, fill=(0, 0, 0))
    for row, (image, image_masks) in enumerate(zip(images, masks)):
        tiles = [image] + [overlay_mask(image, mask) for mask in image_masks]
        top = head + caption + row * (tile_h + pad)
        for col, tile in enumerate(tiles):
            tile_img = Image.fromarray(tile).resize(
                (tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
            figure.paste(tile_img, (pad + col * (tile_w + pad), top))
    return figure
