"""The one-time deploy step of SAR-ResNet (mmpretrain RepVGG style).

:func:`deploy_backbone` turns an eval :class:`~sar_backbones.models.SARResNet`
into its inference form, in place:

* every BatchNorm is folded into the convolution before it (stem, base and
  refine branches, alignments, transitions, stage 4, region selectors): the
  conv + norm pair becomes one convolution with a bias and an
  ``nn.Identity``, so the deployed module's weights *are* the prepared state
  and nothing can go stale;
* 3x3 weights are stored channels-last, the layout of the sparse path's
  gathered windows; the refine blocks' grouped weights are used as they are
  by the batched sparse kernels (one grouped product for all ``G`` groups);
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
from torch.nn.modules.batchnorm import _BatchNorm

from sar_backbones.models.layers.blocks import ResidualBlock, folded_conv, is_plain_conv


def _check_deployable(backbone: nn.Module) -> None:
    """Refuse, before changing anything, what the deploy step cannot fold exactly."""
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
    _check_deployable(backbone)
    _fold_stem(backbone)
    for index, stage in enumerate(backbone.sar_stages, start=1):
        stage.set_name(f'layer{index}')
        stage.switch_to_deploy()
    for block in backbone.layer4:
        block.switch_to_deploy()
    left = [name for name, module in backbone.named_modules() if isinstance(module, _BatchNorm)]
    if left:
        raise AssertionError(f'deploy left BatchNorm layers unfolded: {left}')
    backbone._deployed = True
