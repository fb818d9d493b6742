"""Models of sar_backbones: the SAR backbones and (loaded on first use) the task wrappers."""
from . import integration
from .backbones import *  # noqa: F401,F403
from .integration import (BackboneCheckpointMismatchError, CheckpointReadError,  # noqa: F401
                          SARLossMixin, UnsafeCheckpointError, check_backbone_state_dict,
                          describe_backbone, load_checkpoint_file)


def __getattr__(name: str):
    # The task wrappers import their library (mmdet, mmseg, mmpretrain) on first use.
    return getattr(integration, name)
