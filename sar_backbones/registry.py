"""Registries of the ``sar_backbones`` scope.

They are children of mmengine's root registries, so a config running under the
mmdet, mmseg or mmpretrain default scope can build ``type='sar_backbones.X'``
once ``custom_imports=dict(imports=['sar_backbones'])`` has imported the package
(the task wrappers of the installed mmdet/mmseg/mmpretrain register on first use).
Never set ``default_scope='sar_backbones'``: the task's own scope must stay the
default so that its datasets, heads and metrics resolve.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='sar_backbones',
    # The task wrappers register lazily, when a config first builds a model of
    # this scope: importing the package needs no task library.
    locations=['sar_backbones.models', 'sar_backbones.models.integration.task_models'])
HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope='sar_backbones',
    locations=['sar_backbones.engine'])
