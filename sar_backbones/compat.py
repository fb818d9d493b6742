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
   objects and numpy arrays and scalars from the message hub, which the safe
   loader refuses, so ``resume=True``, ``load_from``, ``Pretrained``
   ``init_cfg`` with a local file and the inferencers all fail with
   ``UnpicklingError``.

   The fix keeps PyTorch's safe loading and widens it by exactly the types
   such checkpoints hold (:func:`mmengine_checkpoint_safe_globals`; ``getattr``
   only as far as ``HistoryBuffer``'s statistics methods need it):
   mmengine's local-file loader (the ``''`` entry of ``CheckpointLoader``'s
   scheme table, which every caller above goes through) is replaced by
   :func:`sar_backbones.models.backbones.checkpoint.load_checkpoint_file`,
   which runs ``torch.load(..., weights_only=True)`` inside
   ``torch.serialization.safe_globals(<those types>)``. The allowance is
   scoped to that call: a bare ``torch.load`` elsewhere in the process keeps
   PyTorch's default list. A file that needs anything else (for example an
   object whose ``__reduce__`` calls ``os.system``) is refused with
   :class:`~sar_backbones.models.backbones.checkpoint.UnsafeCheckpointError`,
   which names the file and the offending globals; whoever trusts such a
   file can still load it themselves with ``torch.load(path,
   weights_only=False)`` and hand the resulting dict on.

   An inferencer (``mmpretrain.ImageClassificationInferencer``,
   ``mmdet.apis.DetInferencer``, ...) given only a checkpoint reads it
   before it imports anything the checkpoint's config names, so import
   ``sar_backbones`` first. URL checkpoints go through
   ``torch.hub.load_state_dict_from_url`` and are left as mmengine loads
   them, and so are the remaining ``torch.load`` calls in that file (pavi,
   petrel/s3 and mmengine-home ``open-mmlab://`` files), which serve
   storage this project does not use.

Known but deliberately not patched (not on this project's code paths):
``np.in1d`` (removed in numpy 2.4) in mmpretrain's retrieval metrics and
``np.float``/``np.long`` in mmdet's YouTube-VIS evaluation and text transforms.
"""
import collections
import functools
import inspect
import pickle
from typing import Any, Callable, List, Optional, Tuple, Union

# Marks the functions installed by this module so that a second call to
# ``apply_patches`` (or a reload of this module) never wraps twice.
_PATCH_MARK = '_sar_backbones_patch'

SafeGlobal = Union[Callable, Tuple[Callable, str]]


def _is_patched(func: Callable) -> bool:
    return getattr(func, _PATCH_MARK, False)


def _numpy_safe_globals() -> List[SafeGlobal]:
    """The numpy callables that rebuild pickled arrays, scalars and dtypes.

    ``ndarray.__reduce__`` pickles ``multiarray._reconstruct`` with
    ``ndarray`` and a ``dtype``; a numpy scalar pickles ``multiarray.scalar``
    with its dtype, and a dtype's state is restored on its concrete class
    (``numpy.dtypes.Float64DType``, ...), of which only the numeric and
    boolean ones are allowed. numpy 2 writes ``numpy._core``, numpy 1 wrote
    ``numpy.core``: both names are accepted so that checkpoints from either
    environment load. None of these runs code named by the file.
    """
    import numpy as np

    # numpy >= 2 keeps the module under ``_core`` (``core`` is a deprecated alias).
    multiarray = (np._core if hasattr(np, '_core') else np.core).multiarray
    found: List[SafeGlobal] = [np.ndarray, np.dtype]
    for name in ('_reconstruct', 'scalar'):
        func = getattr(multiarray, name)
        found += [func, (func, f'numpy.core.multiarray.{name}')]
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
             np.uint64, np.float16, np.float32, np.float64, np.longdouble, np.complex64,
             np.complex128)
    found += sorted({type(np.dtype(kind)) for kind in kinds}, key=lambda cls: cls.__name__)
    return found


def _history_buffer_method(owner: Any, name: Any) -> Callable:
    """What ``getattr`` may do while a checkpoint is unpickled: fetch a HistoryBuffer method.

    A ``HistoryBuffer`` keeps its statistics functions (``HistoryBuffer.min``,
    ``max``, ``current``, ``mean``) in its state, and pickle writes such a
    function as ``getattr(HistoryBuffer, 'min')``. Allowing ``getattr`` itself
    would let a file walk from any allowed object to arbitrary code (e.g.
    through ``__init__.__globals__``), so this stand-in is registered under the
    name ``builtins.getattr`` instead: it returns only public functions defined
    on ``HistoryBuffer``.

    Raises:
        pickle.UnpicklingError: For anything else, worded like PyTorch's own
            refusal so that the loader reports the file as unsafe.
    """
    from mmengine.logging import HistoryBuffer
    if owner is HistoryBuffer and isinstance(name, str) and not name.startswith('_'):
        value = HistoryBuffer.__dict__.get(name)
        if inspect.isfunction(value):
            return value
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL builtins.getattr({owner!r}, {name!r}) (only the public '
        "methods of mmengine's HistoryBuffer may be looked up)")


@functools.lru_cache(maxsize=None)
def _safe_globals_cached() -> Tuple[SafeGlobal, ...]:
    from mmengine.logging import HistoryBuffer
    return (HistoryBuffer, collections.OrderedDict, (_history_buffer_method, 'builtins.getattr'),
            *_numpy_safe_globals())


def mmengine_checkpoint_safe_globals() -> List[SafeGlobal]:
    """What a checkpoint of mmengine's ``Runner`` holds besides tensors and containers.

    These are added (for one load at a time) to the globals PyTorch's
    ``weights_only`` unpickler accepts: mmengine's ``HistoryBuffer`` (the
    message hub's logged scalars) with a ``getattr`` restricted to its
    statistics methods (:func:`_history_buffer_method`),
    ``collections.OrderedDict`` and the numpy array, scalar and dtype
    reconstruction callables. The list was found by
    saving real runner checkpoints of this project's configs (classification,
    detection, segmentation, with and without resume state) and listing
    their globals with ``torch.serialization.get_unsafe_globals_in_checkpoint``;
    ``tests/robustness/test_checkpoints.py`` repeats that check.

    Returns:
        list: Entries for ``torch.serialization.safe_globals``.
    """
    return list(_safe_globals_cached())


def _patch_mmengine_local_checkpoint_loader() -> None:
    """Make mmengine load local checkpoints safely, allowing what its checkpoints hold.

    ``CheckpointLoader`` dispatches on the path prefix through its
    ``_schemes`` table, and ``''`` (any path without a URL scheme) maps to
    ``load_from_local``. Replacing that table entry covers every caller
    (``Runner.resume``/``load_checkpoint``,
    ``mmengine.runner.load_checkpoint``, ``PretrainedInit``, the inferencers),
    including modules that imported the helper functions by name before this
    ran.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    original = CheckpointLoader._schemes.get('')
    if original is None or _is_patched(original):
        return

    @functools.wraps(original)
    def load_from_local(filename: str, map_location: Optional[Any] = None) -> Any:
        """Load a local mmengine checkpoint with weights-only unpickling.

        Args:
            filename (str): Local checkpoint path; ``~`` is expanded.
            map_location (optional): Same as :func:`torch.load`.

        Returns:
            dict: The loaded checkpoint.

        Raises:
            CheckpointReadError: If the file is missing, unreadable, not a
                checkpoint dict, or needs globals that are not allowed
                (:class:`UnsafeCheckpointError`).
        """
        # Imported here: this module is imported before the models package.
        from sar_backbones.models.backbones.checkpoint import load_checkpoint_file
        return load_checkpoint_file(filename, map_location=map_location)

    setattr(load_from_local, _PATCH_MARK, True)
    # ``functools.wraps`` keeps the original as ``__wrapped__``: tests use it
    # to show that the unpatched loader fails on the same file.
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def apply_patches() -> None:
    """Apply every compatibility fix; calling it again is a no-op."""
    _patch_mmengine_local_checkpoint_loader()
