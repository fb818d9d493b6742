"""SAR-ResNet backbones for OpenMMLab."""
from .compat import apply_patches
from .version import __version__  # noqa: F401

# Fix the pinned stack's known breakages on recent PyTorch before anything
# else uses mmengine (see ``sar_backbones/compat.py``).
apply_patches()

# Importing the sub-packages registers the backbone, task models and hooks in
# the ``sar_backbones`` registries (what ``custom_imports`` relies on).
from . import engine, models  # noqa: E402,F401
