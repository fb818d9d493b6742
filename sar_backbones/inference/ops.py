"""The sparse refine work as a registered custom operator that ``torch.compile`` can trace.

``sar_backbones::refine_stage`` wraps :func:`~.sparse.refine_stage`: its
patch count is data-dependent (it follows the masks), but its output has the
static shape of the stage's feature map, which is all the fake
implementation needs. Dynamo therefore traces a deployed stage in one graph
(base branch, selectors, fusion compiled; the op called as an opaque kernel),
and new masks (another image) are new op inputs, not a new graph.

On CPU float32 the op runs the fused native kernel (:mod:`.native`,
``sar_native::refine_stage``) where it is built, on CUDA the Triton kernels
(:mod:`.triton_refine`); elsewhere, or with ``SAR_REFINE_KERNEL=torch``, the
PyTorch implementation of :mod:`.sparse`.
"""
from typing import List

import torch
from torch import Tensor

from . import native, triton_refine
from .sparse import output_channels, refine_stage


def refine_stage_impl(x: Tensor, masks: Tensor, weights: List[Tensor], biases: List[Tensor],
                      convs_per_block: int, shortcuts: List[int], last_relus: List[int],
                      dilation: int) -> Tensor:
    """The refine work: the fused kernel of the device where there and chosen, else PyTorch."""
    kernel = native.refine_kernel()
    if kernel == 'triton' or (x.is_cuda and kernel != 'torch'):
        if triton_refine.available(x):
            return triton_refine.refine_stage(x, masks, weights, biases, convs_per_block,
                                              shortcuts, last_relus, dilation)
        if kernel != 'auto':
            raise RuntimeError(f'SAR_REFINE_KERNEL={kernel}: the Triton refine kernels cannot '
                               f'run on this {x.device.type} {x.dtype} input '
                               f'({triton_refine.unavailable_reason(x)})')
    if native.use_native(x) and native.supports(weights, convs_per_block, shortcuts):
        return native.refine_stage(x, masks, weights, biases, convs_per_block, shortcuts,
                                   last_relus, dilation)
    return refine_stage(x, masks, weights, biases, convs_per_block, shortcuts, last_relus,
                        dilation)


@torch.library.custom_op('sar_backbones::refine_stage', mutates_args=())
def refine_stage_op(x: Tensor, masks: Tensor, weights: List[Tensor], biases: List[Tensor],
                    convs_per_block: int, shortcuts: List[int], last_relus: List[int],
                    dilation: int) -> Tensor:
    """See :func:`sar_backbones.inference.sparse.refine_stage` (and :func:`refine_stage_impl`)."""
    return refine_stage_impl(x, masks, weights, biases, convs_per_block, shortcuts, last_relus,
                             dilation)


@refine_stage_op.register_fake
def _(x: Tensor, masks: Tensor, weights: List[Tensor], biases: List[Tensor],
      convs_per_block: int, shortcuts: List[int], last_relus: List[int],
      dilation: int) -> Tensor:
    batch, _, height, width = x.shape
    return x.new_empty((batch, output_channels(weights, shortcuts), height, width)).contiguous(
        memory_format=torch.channels_last)


def run_refine_stage(x: Tensor, masks: Tensor, weights: List[Tensor], biases: List[Tensor],
                     convs_per_block: int, shortcuts: List[int], last_relus: List[int],
                     dilation: int) -> Tensor:
    """The refine op: the registered operator under ``torch.compile``, the function itself in eager.

    Eager calls skip the operator's dispatch (tens of microseconds per call);
    both run the same code (:func:`refine_stage_impl`).
    """
    run = refine_stage_op if torch.compiler.is_compiling() else refine_stage_impl
    return run(x, masks, list(weights), list(biases), convs_per_block, list(shortcuts),
               list(last_relus), dilation)
