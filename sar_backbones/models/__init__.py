"""Models of sar_backbones: the SAR-ResNet backbone and the task wrappers."""
from .backbones import *  # noqa: F401,F403
from .integration import *  # noqa: F401,F403
