"""Pieces of the demo's report (``tools/demo.py``): costs, tables, mask overlays.

* :func:`resnet_baseline_macs` counts a plain ResNet with the same depth,
  widths, stem, strides and dilations as a SAR-ResNet, in the paper's MAC
  convention (:func:`sar_backbones.analysis.count_macs`).
* :func:`backbone_costs` puts a SAR backbone's effective MACs at measured
  activation rates next to its all-selected cost and that ResNet.
* :func:`results_markdown` formats the demo's results table.
* :func:`stage_weights` and :func:`mask_figure` lay out, for a few images,
  which regions each SAR stage chose to refine (the masks and overlays
  themselves come from :mod:`sar_backbones.analysis.mask_vis`).
"""
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import nn

from ..engine.hooks import get_sar_backbone
from .complexity import count_macs, model_complexity
from .mask_vis import GROUP_COLOURS, overlay, stage_group_weights

# Tint of refined regions; stages average their groups, so one colour.
REFINE_COLOUR = GROUP_COLOURS[0]


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

    sar = get_sar_backbone(backbone)
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
def stage_weights(collected: Dict[str, object]) -> List[np.ndarray]:
    """Per SAR stage, the share of blocks and groups refining each image pixel.

    Args:
        collected (dict): What :func:`sar_backbones.analysis.collect_masks`
            returns for one image.

    Returns:
        list[np.ndarray]: One ``(H, W)`` float map in [0, 1] per stage.
    """
    weights = stage_group_weights(collected)
    stages = sorted({stage for stage, _ in weights})
    return [np.mean([w for (s, _), w in weights.items() if s == stage], axis=0)
            for stage in stages]


def mask_figure(images: Sequence[np.ndarray], weights: Sequence[Sequence[np.ndarray]],
                title: str, scale: int = 2, column_titles: Optional[Sequence[str]] = None
                ) -> Image.Image:
    """A grid: one row per image, its input and one overlay per SAR stage.

    Args:
        images (Sequence[np.ndarray]): ``(H, W, 3)`` uint8 RGB images.
        weights (Sequence[Sequence[np.ndarray]]): Per image, one ``(H, W)``
            map in [0, 1] per stage (see :func:`stage_weights`).
        title (str): Text above the grid.
        scale (int): Upscaling of every tile (nearest), for small images.
        column_titles (Sequence[str], optional): Defaults to ``input``,
            ``stage 1`` ... with each stage's mean rate over the shown images.

    Returns:
        PIL.Image.Image: The figure.
    """
    num_stages = len(weights[0])
    if column_titles is None:
        column_titles = ['input'] + [
            f'stage {s + 1}: {np.mean([w[s].mean() for w in weights]):.2f} refined'
            for s in range(num_stages)]
    tile_h = max(img.shape[0] for img in images) * scale
    tile_w = max(img.shape[1] for img in images) * scale
    pad, head, caption = 4, 16, 14
    width = max((num_stages + 1) * (tile_w + pad) + pad, 6 * len(title) + 2 * pad)
    height = head + caption + len(images) * (tile_h + pad) + pad
    figure = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    draw.text((pad, 2), title, fill=(0, 0, 0))
    for col, text in enumerate(column_titles):
        draw.text((pad + col * (tile_w + pad), head), text, fill=(0, 0, 0))
    for row, (image, image_weights) in enumerate(zip(images, weights)):
        tiles = [image] + [overlay(image, weight, REFINE_COLOUR) for weight in image_weights]
        top = head + caption + row * (tile_h + pad)
        for col, tile in enumerate(tiles):
            tile_img = Image.fromarray(tile).resize(
                (tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
            figure.paste(tile_img, (pad + col * (tile_w + pad), top))
    return figure
