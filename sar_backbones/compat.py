"""Compatibility fixes for the pinned OpenMMLab stack on a recent PyTorch.

The project pins mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0, mmseg 1.2.2 and
mmpretrain 1.2.0, all released before PyTorch 2.6, and runs them on torch
2.14. Every fix for a breakage *inside that stack* lives here, in one place,
and is applied once by :func:`apply_patches` when ``sar_backbones`` is
imported (configs import the package through ``custom_imports``, so training
and testing from the OpenMMLab tools get the fixes too).

Fixes:

1. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, while
   mmengine 0.10.7 calls it without the argument (``load_from_local`` in
   ``mmengine/runner/checkpoint.py``; upstream issue open-mmlab/mmengine#1655).
   A checkpoint written by mmengine's ``Runner`` pickles ``HistoryBuffer``
   objects and numpy arrays from the message hub, so ``resume=True``,
   ``load_from`` and ``Pretrained`` ``init_cfg`` with a local file all fail
   with ``UnpicklingError``. The local-file checkpoint loader is re-registered
   with ``weights_only=False``, which is the behaviour mmengine was written
   and tested against. URL checkpoints need nothing: they go through
   ``torch.hub.load_state_dict_from_url``, which still defaults to
   ``weights_only=False``. The remaining ``torch.load`` calls in that file
   (pavi, petrel/s3 and mmengine-home ``open-mmlab://`` files) serve storage
   this project does not use and are left alone. ``torch.load`` itself is
   not touched, so code outside mmengine keeps PyTorch's safer default.

   As with any pickle, only load checkpoints from sources you trust.

Known but deliberately not patched (not on this project's code paths):
``np.in1d`` (removed in numpy 2.4) in mmpretrain's retrieval metrics and
``np.float``/``np.long`` in mmdet's YouTube-VIS evaluation and text transforms.
"""
import functools
import os.path as osp
from typing import Any, Callable, Optional

import torch
from mmengine.utils import digit_version

# Marks the functions installed by this module so that a second call to
# ``apply_patches`` (or a reload of this module) never wraps twice.
_PATCH_MARK = '_sar_backbones_patch'


def _is_patched(func: Callable) -> bool:
    return getattr(func, _PATCH_MARK, False)


def _torch_loads_weights_only_by_default() -> bool:
    """Whether ``torch.load`` without ``weights_only`` refuses full pickles."""
    return digit_version(torch.__version__) >= digit_version('2.6.0')


def _patch_mmengine_local_checkpoint_loader() -> None:
    """Make mmengine load local checkpoints with ``weights_only=False``.

    ``CheckpointLoader`` dispatches on the path prefix through its
    ``_schemes`` table, and ``''`` (any path without a URL scheme) maps to
    ``load_from_local``. Replacing that table entry covers every caller
    (``Runner.resume``/``load_checkpoint``,
    ``mmengine.runner.load_checkpoint``, ``PretrainedInit``), including
    modules that imported the helper functions by name before this ran.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    original = CheckpointLoader._schemes.get('')
    if original is None or _is_patched(original):
        return

    @functools.wraps(original)
    def load_from_local(filename: str,
                        map_location: Optional[Any] = None) -> Any:
        """Load a local mmengine checkpoint, trusting its pickled objects.

        Args:
            filename (str): Local checkpoint path; ``~`` is expanded.
            map_location (optional): Same as :func:`torch.load`.

        Returns:
            dict | OrderedDict: The loaded checkpoint.
        """
        # Resolve the path and validate it before loading (as the original
        # loader does), so a missing file still raises FileNotFoundError
        # rather than a torch error.
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(
            filename, map_location=map_location, weights_only=False)

    setattr(load_from_local, _PATCH_MARK, True)
    # ``functools.wraps`` keeps the original as ``__wrapped__``: tests use it
    # to show that the unpatched loader fails on the same file.
    CheckpointLoader.register_scheme(
        prefixes='', loader=load_from_local, force=True)


def apply_patches() -> None:
    """Apply every compatibility fix; calling it again is a no-op."""
    if _torch_loads_weights_only_by_default():
        _patch_mmengine_local_checkpoint_loader()
