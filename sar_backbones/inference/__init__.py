"""The inference engine of SAR-ResNet: patch layout, gather/scatter kernels, custom ops, deploy.

* :mod:`.sparse`: the sparse refine branch (gather, convolve, scatter) as a
  pure function of the input, the masks and the folded weights;
* :mod:`.ops`: the same registered as the custom operator
  ``sar_backbones::refine_stage`` for ``torch.compile``;
* :mod:`.native`: the fused C++ kernel of that op on CPU float32 (built once by
  ``scripts/install.sh``; ``SAR_REFINE_KERNEL=auto|native|torch`` chooses);
* :mod:`.memory_format`: NCHW <-> NHWC copies;
* :mod:`.deploy`: the one-time deploy step (``SARResNet.switch_to_deploy()``).

The engine does not import the model package, so that the model layers can
import it; :func:`deploy_backbone` is loaded on first use.
"""
from .memory_format import memory_format_of
from .ops import refine_stage_op, run_refine_stage
from .sparse import StageWeights, refine_stage

__all__ = ['memory_format_of', 'refine_stage', 'refine_stage_op', 'run_refine_stage',
           'StageWeights', 'deploy_backbone']


def __getattr__(name: str):
    if name == 'deploy_backbone':
        from .deploy import deploy_backbone
        return deploy_backbone
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
