"""Check that backbone weights fit a SAR-ResNet before they are used.

mmengine's ``Pretrained`` initialiser and its ``load_checkpoint`` (``load_from``,
``resume``, ``tools/test.py``) load with ``strict=False`` and only *log*
missing, unexpected or mis-shaped keys, so a model built with another depth
or group number than the checkpoint would silently keep random weights in
part of its backbone. ``SARResNet`` therefore checks every state dict loaded
into it (:class:`~sar_backbones.models.backbones.checkpoint.ArchitectureCheckedLoading`),
and this module exposes the same comparison as a check that tools (the
checkpoint converter's ``--check-config``) and tests run on a state dict in
memory. The implementation lives in
:mod:`sar_backbones.models.backbones.checkpoint`, in one place with the
loading code; the names are re-exported here for the task-level API.
"""
from ..backbones.checkpoint import (BackboneCheckpointMismatchError, CheckpointReadError,
                                    UnsafeCheckpointError, check_backbone_state_dict,
                                    describe_backbone, load_checkpoint_file)

__all__ = [
    'BackboneCheckpointMismatchError', 'CheckpointReadError', 'UnsafeCheckpointError',
    'check_backbone_state_dict', 'describe_backbone', 'load_checkpoint_file'
]
