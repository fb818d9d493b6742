"""The one-time deploy step of SAR-ResNet (mmpretrain RepVGG style).

:func:`deploy_backbone` turns an eval :class:`~sar_backbones.models.SARResNet`
into its inference form, in place:

* every BatchNorm is folded into the convolution before it (stem, base and
  refine branches, alignments, transitions, stage 4, region selectors): the
  conv + norm pair becomes one convolution with a bias and an
  ``nn.Identity``, so the deployed module's weights *are* the prepared state
  and nothing can go stale;
* the refine blocks' weights (CPU) are re-stored in the layout of the native
  refine kernel (:func:`kernel_layout`: HWIO, ``(k, k, C_in/groups, C_out)``
  in memory with padded rows, the same ``(C_out, C_in/groups, k, k)`` tensor
  to everything else): that is the weight prepacking, done once here. The kernel reads the
  weights in place, so a forward packs nothing and caches nothing, and a
  weight changed after deploying (in place or by ``load_state_dict``) is
  used at once -- nothing can go stale, no new deploy is needed. The state
  dict is unchanged (same keys, shapes and values). Undeployed models run
  the kernel too, laying their folded weights out per call (the slow path);
  other 3x3 weights are stored channels-last, the layout of the PyTorch
  path's gathered windows;
* the region selectors of a stage become one stacked module
  (:class:`~sar_backbones.models.layers.StackedRegionSelectors`).

Afterwards a forward walks no parameters and consults no cache keyed by
weights, and every stage traces into one ``torch.compile`` graph (the sparse
work is the custom operator ``sar_backbones::refine_stage``). ``train()`` on a
deployed model is an error; ``set_inference_mode('dense')`` still computes the
dense masked function with the folded weights.
"""
import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from sar_backbones.models.layers.blocks import ResidualBlock, folded_conv, is_plain_conv


def check_deployable(backbone: nn.Module) -> None:
    """Refuse, before changing anything, what the deploy step cannot fold exactly.

    Shared by every SAR backbone's ``switch_to_deploy()``.

    Args:
        backbone (nn.Module): The model to deploy.

    Raises:
        TypeError: a norm other than BatchNorm, a plugin or deformable block,
            or a convolution other than a plain one is in the model.
        ValueError: a parameter or buffer is NaN or infinite.
    """
    for name, module in backbone.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
            raise TypeError(f'switch_to_deploy() folds BatchNorm into the convolutions; {name} is '
                            f"a {type(module).__name__}: keep such a model undeployed "
                            "(inference_mode='dense')")
        if isinstance(module, ResidualBlock):
            module.check_deployable(name)  # deformable convs, plugins
        if isinstance(module, nn.Conv2d) and not is_plain_conv(module):
            raise TypeError(f'switch_to_deploy(): {name} is a {type(module).__name__}, not a plain '
                            'convolution (conv_cfg=None); its BatchNorm cannot be folded exactly')
    for kind, tensors in (('parameter', backbone.named_parameters()),
                          ('buffer', backbone.named_buffers())):
        for name, tensor in tensors:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f'switch_to_deploy(): {kind} {name} holds NaN or inf; the model '
                                 'would compute garbage (a NaN selector refines nothing): '
                                 'check the checkpoint')


_check_deployable = check_deployable  # the former private name


ROW_PADDING = 16  # floats after each B row of a prepacked weight (one cache line)


def kernel_layout(weight: Tensor) -> Tensor:
    """The same weight ``(C_out, C_in/groups, k, k)`` stored as the native kernel reads it.

    The kernel reads row ``(tap, input channel)`` of its GEMM operand B as
    ``C_out`` contiguous floats (its 16-column panels are column ranges of a
    row): HWIO memory order, ``(k, k, C_in/groups, C_out)``, each row padded
    by :data:`ROW_PADDING` floats so that the rows of a panel (``C_out`` is a
    power of two) do not all map to the same cache sets. Returned as a
    strided view of that padded storage: to every other user it is the same
    tensor (values, shape, state-dict entry).
    """
    out_channels, in_channels, height, width = weight.shape
    storage = weight.new_zeros(height, width, in_channels, out_channels + ROW_PADDING)
    storage[..., :out_channels] = weight.detach().permute(2, 3, 1, 0)
    return storage[..., :out_channels].permute(3, 2, 0, 1)


def is_kernel_layout(weight: Tensor) -> bool:
    """Whether ``weight`` is stored as :func:`kernel_layout` stores it (read in place)."""
    out_channels, in_channels, height, width = weight.shape
    row = weight.stride(1)
    return weight.stride(0) == 1 and row == out_channels + ROW_PADDING and \
        weight.stride(2) == width * in_channels * row and weight.stride(3) == in_channels * row


def _prepack_refine_weights(stage: nn.Module) -> None:
    """Store each refine block's folded weights (CPU only) in :func:`kernel_layout`.

    CUDA weights keep their layout: the sparse path there is PyTorch's,
    for which a non-standard layout would cost a copy per call.
    """
    for block in stage.refine_blocks:
        convs = [conv for conv, _ in block.convs_and_norms]
        if block.shortcut is not None:
            convs.append(block.shortcut[1])
        for conv in convs:
            if conv.weight.device.type == 'cpu':
                conv.weight = nn.Parameter(kernel_layout(conv.weight),
                                           requires_grad=conv.weight.requires_grad)


def _fold_stem(backbone: nn.Module) -> None:
    if backbone.deep_stem:
        stem = backbone.stem
        for index in range(0, len(stem), 3):  # (conv, norm, ReLU) x 3
            stem[index] = folded_conv(stem[index], stem[index + 1], f'stem.{index}')
            stem[index + 1] = nn.Identity()
    else:
        backbone.conv1 = folded_conv(backbone.conv1, backbone.bn1, 'conv1')
        backbone.bn1 = nn.Identity()


def deploy_backbone(backbone: nn.Module) -> None:
    """Deploy an eval SAR-ResNet in place (``SARResNet.switch_to_deploy()``); see the module doc.

    Args:
        backbone (SARResNet): The backbone, in eval mode. Deploying twice is a no-op.

    Raises:
        RuntimeError: the model is in training mode.
        TypeError: a norm other than BatchNorm or a convolution other than a
            plain one (``conv_cfg``) is in the model.
        ValueError: a weight or statistic is NaN or infinite.
    """
    if getattr(backbone, '_deployed', False):
        return
    if backbone.training:
        raise RuntimeError('switch_to_deploy() needs an eval model: call .eval() first')
    check_deployable(backbone)
    _fold_stem(backbone)
    for index, stage in enumerate(backbone.sar_stages, start=1):
        stage.set_name(f'layer{index}')
        stage.switch_to_deploy()
        _prepack_refine_weights(stage)
    for block in backbone.layer4:
        block.switch_to_deploy()
    left = [name for name, module in backbone.named_modules() if isinstance(module, _BatchNorm)]
    if left:
        raise AssertionError(f'deploy left BatchNorm layers unfolded: {left}')
    backbone._deployed = True
