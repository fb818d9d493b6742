"""SAR-ResNet backbones for OpenMMLab."""
from .version import __version__
