"""Parameters and FLOPs of the SAR backbones in the paper's convention.

FLOPs are multiply-accumulates, counted as the authors counted them: every
convolution and linear layer, average/max pooling at ``kernel area x output
size`` and global pooling at its input size; BN, ReLU, upsampling and additions
are free. The convolutions of a refine block cost ``r x`` their dense cost for
that block's activation rate ``r``; everything else (base branch, region
selectors, alignments, fusion gates, transitions, stage 4, refine shortcuts)
runs densely.
"""
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..engine.hooks import get_sar_backbone
from ..models.backbones import SARResNet
from ..models.layers import RegionSelector

Rate = Union[None, float, Sequence[float], Tensor]


def _module_macs(module: nn.Module, inputs: tuple, output: Tensor) -> int:
    """MACs of one call for a single image (the counting pass uses batch 1)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        k = module.kernel_size
        area = k * k if isinstance(k, int) else k[0] * k[1]
        return output.numel() * area
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return inputs[0].numel()
    if isinstance(module, RegionSelector):
        # Its adaptive pooling over the hidden map: one add per input value.
        hidden = module.conv.out_channels
        return hidden * inputs[0].shape[-2] * inputs[0].shape[-1]
    return 0


_COUNTED = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, RegionSelector)


def count_macs(model: nn.Module, input_shape: Sequence[int],
               bucket: Optional[Callable[[nn.Module], int]] = None,
               forward: Optional[Callable[[Tensor], object]] = None) -> Dict[int, int]:
    """MACs of one image through ``model``, summed per bucket (default: one bucket, 0).

    Works for any module built from standard layers, e.g. a torchvision ResNet
    counted in the same convention as the SAR-ResNet it is compared with.
    """
    totals: Dict[int, int] = {}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        key = 0 if bucket is None else bucket(module)
        totals[key] = totals.get(key, 0) + _module_macs(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
    try:
        param = next(model.parameters())
        with torch.no_grad():
            (forward or model)(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
    return totals


def _last_output(backbone: SARResNet) -> int:
    """Index of the backbone's last output (3 for SAR-ResNet, 6 or 7 for SAR-MobileNetV2)."""
    return getattr(backbone, 'num_outputs', len(backbone.stage_channels)) - 1


def dense_cost(backbone: SARResNet, input_shape: Sequence[int]) -> Dict[str, object]:
    """Static MACs, per-masked-block refine MACs at rate 1 and the last stage's area, one image.

    Works for every SAR backbone whose refine blocks list ``convs_and_norms``
    (SAR-ResNet, SAR-ResNeXt, SAR-MobileNetV2).
    """
    refine_index: Dict[int, int] = {}
    for index, block in enumerate(b for stage in backbone.sar_stages for b in stage.refine_blocks):
        for conv, _ in block.convs_and_norms:
            refine_index[id(conv)] = index + 1  # bucket 0 is the static part
    last_area = [0]

    def forward(x: Tensor) -> None:
        # forward(), not __call__: hooks on the backbone itself (rate loggers
        # averaging over a test set) must not see this all-selected pass.
        last_area[0] = backbone.forward(x)[-1].shape[-2:].numel()

    # The dense path calls every refine conv once.
    with backbone.temporary_settings(training=False, inference_mode='dense', mask_rate=1.0,
                                     out_indices=(_last_output(backbone), )):
        totals = count_macs(backbone, input_shape, lambda m: refine_index.get(id(m), 0), forward)
    num_blocks = backbone.num_masked_blocks
    return {'static': totals.get(0, 0),
            'refine': [totals.get(i, 0) for i in range(1, num_blocks + 1)],
            'last_area': last_area[0]}


def _rates_tensor(rate: Rate, num_blocks: int) -> Tensor:
    """Activation rates as ``(images, blocks)``."""
    if rate is None:
        rate = 1.0
    rates = torch.as_tensor(rate, dtype=torch.float64).detach().cpu()
    if rates.dim() == 0:
        rates = rates.expand(1, num_blocks)
    elif rates.dim() == 1:
        rates = rates.unsqueeze(0)
    if rates.dim() != 2 or rates.shape[1] != num_blocks:
        raise ValueError(f'activation_rate must be a float, {num_blocks} per-block rates or a '
                         f'(images, {num_blocks}) tensor, got shape {tuple(rates.shape)}')
    if ((rates < 0) | (rates > 1)).any():
        raise ValueError('activation rates must lie in [0, 1]')
    return rates


def model_complexity(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224),
                     activation_rate: Rate = None,
                     num_classes: Optional[int] = None) -> Dict[str, object]:
    """Parameters and (effective) FLOPs of a SAR backbone in the paper's convention.

    Args:
        model (nn.Module): A SAR backbone (:class:`SARResNet`, SAR-ResNeXt,
            SAR-MobileNetV2) or a model whose ``backbone`` is one.
        input_shape (Sequence[int]): ``(C, H, W)`` of one image.
        activation_rate: None (everything refined, the dense-equivalent cost),
            one rate for all blocks, one rate per masked block, or measured
            rates ``(images, blocks)`` such as ``get_activation_rates()``.
        num_classes (int, optional): Add the ImageNet classifier head (global
            pooling + FC) to compare with whole-classifier figures.

    Returns:
        dict: ``params``; ``flops`` (effective MACs, mean over images);
        ``flops_dense`` (all selected); ``flops_static`` (the part that does
        not depend on the rate); ``flops_refine`` (per masked block at rate 1);
        ``activation_rate`` (mean); ``flops_per_image`` (list, one per image).

    Example:
        >>> from sar_backbones.models import SARResNet
        >>> model = SARResNet(depth=50, groups=2, base_stride=2, alpha=2, beta=1)
        >>> c = model_complexity(model, activation_rate=0.5, num_classes=1000)
        >>> round(c['flops'] / 1e9, 2), round(c['params'] / 1e6, 2)
        (2.38, 25.02)
    """
    backbone = get_sar_backbone(model)
    cost = dense_cost(backbone, input_shape)
    params = sum(p.numel() for p in backbone.parameters())
    static = cost['static']
    if num_classes is not None:
        channels = backbone.stage_channels[_last_output(backbone)]
        static += channels * cost['last_area'] + channels * num_classes
        params += channels * num_classes + num_classes
    refine = torch.tensor(cost['refine'], dtype=torch.float64)
    rates = _rates_tensor(activation_rate, len(refine))
    per_image = static + rates @ refine
    return {
        'params': params,
        'flops': float(per_image.mean()),
        'flops_dense': float(static + refine.sum()),
        'flops_static': float(static),
        'flops_refine': refine.tolist(),
        'activation_rate': float(rates.mean()),
        'flops_per_image': per_image.tolist(),
    }
