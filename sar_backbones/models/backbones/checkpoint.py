"""Reading checkpoint files, and checking that weights fit the backbone they are loaded into.

Three guarantees live here, in one place, for every loading path of the project
(``tools/test.py``, ``load_from``, ``resume``, ``init_cfg=dict(type='Pretrained')``,
the converter and the analysis tools):

* :func:`load_checkpoint_file` reads a file with PyTorch's weights-only
  unpickler, widened by exactly what mmengine checkpoints hold
  (:func:`sar_backbones.compat.mmengine_checkpoint_safe_globals`), and turns
  every way a file can be unreadable into a one-line
  :class:`CheckpointReadError` naming it.
* :class:`ArchitectureCheckedLoading` makes a backbone record its
  architecture in every state dict (``<prefix>_extra_state``) and refuse, when
  it is loaded, weights of another architecture with
  :class:`BackboneCheckpointMismatchError`, even under mmengine's
  ``strict=False`` loading, which otherwise only logs the differences.
* :func:`load_pretrained` loads ``Pretrained`` weights strictly.
"""
import json
import os
import os.path as osp
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from sar_backbones.compat import mmengine_checkpoint_safe_globals

_MAX_LISTED = 8
# ``torch.nn.Module`` saves ``get_extra_state()`` under this name.
EXTRA_STATE_KEY = '_extra_state'
# Format of the architecture record; bump when its meaning changes.
_RECORD_FORMAT = 1

PathLike = Union[str, 'os.PathLike[str]']


class CheckpointReadError(ValueError):
    """A file cannot be read as a checkpoint (missing, not a checkpoint, truncated, ...)."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint needs globals that weights-only loading does not allow."""


class BackboneCheckpointMismatchError(ValueError):
    """A backbone checkpoint does not fit the backbone it is loaded into."""


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    line = ' '.join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + '...'


def _refused_globals(path: str, error: Exception) -> Sequence[str]:
    """The globals that made weights-only unpickling refuse ``path`` (empty if none did)."""
    if zipfile.is_zipfile(path):
        # Lists every refused global, not just the first one.
        try:
            with torch.serialization.safe_globals(mmengine_checkpoint_safe_globals()):
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if names:
                return sorted(set(names))
        except Exception:  # noqa: BLE001  (a broken archive: fall back to the message)
            pass
    # Also a call that an allowed global refused (the restricted ``getattr``).
    return sorted(set(re.findall(r'Unsupported global: GLOBAL ([\w.]+(?:\([^)]*\))?)',
                                 str(error))))


def load_checkpoint_file(path: PathLike, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Read a checkpoint file safely: tensors, containers and mmengine's own types only.

    Runs ``torch.load(path, weights_only=True)`` with mmengine's checkpoint
    types allowed for this one call (see
    :func:`sar_backbones.compat.mmengine_checkpoint_safe_globals`). This is
    what mmengine's local checkpoint loader runs once ``sar_backbones`` is
    imported, so ``resume``, ``load_from``, ``Pretrained`` and the tools all
    read files the same way.

    Args:
        path (str | PathLike): A local file; ``~`` is expanded.
        map_location (optional): Same as :func:`torch.load`. Defaults to
            ``'cpu'``.

    Returns:
        dict: The checkpoint (an mmengine checkpoint with ``state_dict``, or a
        bare state dict).

    Raises:
        UnsafeCheckpointError: If unpickling the file would need a global
            outside that list (code could run); the message names the file,
            the globals, and how to load a file one trusts anyway.
        CheckpointReadError: If the file is missing, a directory, not a
            PyTorch file, truncated, or holds something other than a dict
            with a non-empty state dict of named tensors.
    """
    shown = os.fspath(path)
    path = osp.expanduser(shown)
    if not osp.exists(path):
        raise CheckpointReadError(f'checkpoint {shown} does not exist')
    if osp.isdir(path):
        raise CheckpointReadError(f'checkpoint {shown} is a directory, not a checkpoint file')
    try:
        with torch.serialization.safe_globals(mmengine_checkpoint_safe_globals()):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as error:
        raise CheckpointReadError(
            f'checkpoint {shown} cannot be read: {error.strerror or error}') from error
    except Exception as error:  # noqa: BLE001  (torch raises many types for a bad file)
        refused = _refused_globals(path, error) if isinstance(error, pickle.UnpicklingError) \
            else ()
        if refused:
            raise UnsafeCheckpointError(
                f'checkpoint {shown} was refused: unpickling it needs {", ".join(refused)}, '
                'which safe (weights-only) loading does not allow, since a pickle can run code '
                'when it is loaded. Only tensors, containers and the types mmengine checkpoints '
                'hold are accepted. If you trust this file, load it yourself with '
                f'torch.load({shown!r}, weights_only=False) and pass on its state dict') \
                from error
        detail = _one_line(_first_line(error), limit=160)
        raise CheckpointReadError(
            f'checkpoint {shown} is not a readable PyTorch checkpoint (empty, truncated, '
            'corrupted, or not written by torch.save)'
            + (f'; {type(error).__name__}: {detail}' if detail else '')) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointReadError(
            f'checkpoint {shown} holds a {type(checkpoint).__name__}, not a dict of weights '
            '(an mmengine checkpoint or a state dict)')
    extract_state_dict(checkpoint, source=shown)  # weights there, and only tensors
    return checkpoint


def _first_line(error: Exception) -> str:
    """The informative line of a torch loading error (they can span a page)."""
    text = str(error)
    # Weights-only failures wrap the real cause after a long explanation.
    match = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\n\n|$)', text, re.S)
    if match:
        return match.group(1)
    return text.strip().splitlines()[0] if text.strip() else ''


# --------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------


def _is_extra_state(key: str) -> bool:
    return key == EXTRA_STATE_KEY or key.endswith('.' + EXTRA_STATE_KEY)


def extract_state_dict(checkpoint: Mapping, prefix: Optional[str] = None,
                       source: Optional[str] = None) -> 'OrderedDict[str, Any]':
    """The model weights of an mmengine/mmpretrain checkpoint, optionally under ``prefix``.

    A DDP ``module.`` prefix is removed first.

    Args:
        checkpoint (Mapping): As returned by :func:`load_checkpoint_file`.
        prefix (str, optional): Keep only the keys under this prefix, without
            it (e.g. ``'backbone.'``). Defaults to None (all keys).
        source (str, optional): The file, for messages. Defaults to None.

    Returns:
        OrderedDict: Keys to tensors (and the architecture record, a tensor too).

    Raises:
        CheckpointReadError: If the checkpoint holds no state dict of tensors,
            or nothing under ``prefix``.
    """
    where = f'checkpoint {source}' if source else 'the checkpoint'
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointReadError(f'{where} has a state_dict of type {type(state).__name__}, '
                                  'not a dict of tensors')
    odd = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if odd:
        more = ', ...' if len(odd) > 3 else ''
        raise CheckpointReadError(
            f'{where} is not a state dict of named tensors: {len(odd)} of its {len(state)} '
            f'entries are not (e.g. {", ".join(odd[:3])}{more})')
    if not state:
        raise CheckpointReadError(f'{where} holds no weights (its state dict is empty)')
    state = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                        for k, v in state.items())
    if prefix:
        if not prefix.endswith('.'):
            prefix += '.'
        selected = OrderedDict(
            (k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
        if not selected:
            first = [k for k in state if not _is_extra_state(k)][:3]
            raise CheckpointReadError(f'no weights under prefix {prefix!r} in {where} '
                                      f'(its keys start like {first})')
        state = selected
    return state


def describe_mismatch(model: nn.Module, state: Mapping[str, Any],
                      ignore_missing: Iterable[str] = ()) -> str:
    """Human-readable difference between a model and a state dict ('' when they match).

    Architecture records (``_extra_state``) are not weights and are left out:
    :func:`check_backbone_state_dict` compares them.

    Args:
        model (nn.Module): The model that would receive ``state``.
        state (Mapping[str, Tensor]): Keys relative to ``model``.
        ignore_missing (Iterable[str]): Key suffixes whose absence from
            ``state`` is fine (e.g. ``'num_batches_tracked'``, which mmengine
            ignores too). Defaults to ().

    Returns:
        str: e.g. ``'2 missing in checkpoint: a, b; 1 shape mismatch: c:
        checkpoint (8,) vs model (16,)'``.
    """
    ignore_missing = tuple(ignore_missing)
    expected = {k: v for k, v in model.state_dict().items() if not _is_extra_state(k)}
    missing = [k for k in expected if k not in state
               and not (ignore_missing and k.endswith(ignore_missing))]
    # Keys a backbone leaves out by construction (e.g. SAR-MobileNetV2's last
    # 1x1 conv when no output needs it) are not a mismatch.
    unused = tuple(getattr(model, 'unused_checkpoint_prefixes', ()))
    unexpected = [k for k in state if k not in expected and not _is_extra_state(k)
                  and not (unused and k.startswith(unused))]
    shapes = [f'{k}: checkpoint {_shape(state[k])} vs model {tuple(v.shape)}'
              for k, v in expected.items() if k in state and _shape(state[k]) != tuple(v.shape)]
    lines = []
    for title, items in (('missing in checkpoint', missing),
                         ('not in model', unexpected), ('shape mismatch', shapes)):
        if items:
            listed = ', '.join(items[:_MAX_LISTED])
            more = f' ... and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
            lines.append(f'{len(items)} {title}: {listed}{more}')
    return '; '.join(lines)


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


# --------------------------------------------------------------------------
# Architecture records
# --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-able value: tuples as lists (decoded back to tuples)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f'an architecture record holds ints, floats, bools, strings and tuples, '
                    f'got {value!r}')


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def encode_architecture(architecture: Mapping[str, Any]) -> Tensor:
    """The architecture record as saved in state dicts: JSON bytes in a uint8 tensor.

    A tensor rather than a dict, because mmengine's ``weights_to_cpu`` calls
    ``.cpu()`` on every state-dict value when it saves a checkpoint, EMA
    averaging copies every entry, and a uint8 tensor loads under
    ``weights_only=True`` like any weight.

    Args:
        architecture (Mapping): Plain values (ints, floats, bools, strings,
            tuples), e.g. ``SARResNet.architecture()``.

    Returns:
        Tensor: 1-D uint8.
    """
    record = dict(format=_RECORD_FORMAT, **_plain(dict(architecture)))
    data = json.dumps(record, sort_keys=True).encode('utf-8')
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_architecture(value: Any) -> Dict[str, Any]:
    """Inverse of :func:`encode_architecture` (lists back to tuples).

    Raises:
        BackboneCheckpointMismatchError: If ``value`` is not such a record.
    """
    try:
        if isinstance(value, Tensor):
            if value.dtype != torch.uint8 or value.dim() != 1:
                raise ValueError(f'a {value.dtype} tensor of shape {tuple(value.shape)}')
            value = bytes(value.tolist()).decode('utf-8')
        record = json.loads(value) if isinstance(value, (str, bytes)) else dict(value)
        if not isinstance(record, dict):
            raise ValueError(f'a {type(record).__name__}')
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise BackboneCheckpointMismatchError(
            f'the checkpoint has an unreadable architecture record ({EXTRA_STATE_KEY}): {error}') \
            from error
    record.pop('format', None)
    return _tuples(record)


def _same(a: Any, b: Any) -> bool:
    return _tuples(_plain(a)) == _tuples(_plain(b))


def describe_architecture(architecture: Mapping[str, Any], name: str = 'SARResNet') -> str:
    """``SARResNet(depth=50, mask_groups=2, ...)`` from an architecture record."""
    parts = [f'{k}={v!r}' for k, v in architecture.items() if k != 'type']
    return f'{architecture.get("type", name)}({", ".join(parts)})'


def describe_backbone(backbone: nn.Module) -> str:
    """A one-line summary of a backbone's architecture, e.g. for messages.

    Args:
        backbone (nn.Module): Usually a ``SARResNet``.

    Returns:
        str: e.g. ``SARResNet(depth=50, in_channels=3, stem_channels=64,
        base_channels=64, mask_groups=2, base_strides=(2, 2, 2), alpha=2,
        beta=1, deep_stem=False)``.
    """
    if hasattr(backbone, 'architecture'):
        arch = dict(backbone.architecture())
        arch.pop('type', None)
        return describe_architecture(arch, type(backbone).__name__)
    return type(backbone).__name__


def architecture_differences(model: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> str:
    """``'base_strides: checkpoint (4, 4, 2) vs model (2, 2, 2); ...'`` ('' when they agree).

    Options recorded on one side only (a record of another version of the
    package) are not compared.
    """
    return '; '.join(f'{key}: checkpoint {checkpoint[key]!r} vs model {value!r}'
                     for key, value in model.items()
                     if key in checkpoint and not _same(value, checkpoint[key]))


def check_backbone_state_dict(backbone: nn.Module, state_dict: Mapping[str, Any],
                              source: Optional[str] = None) -> None:
    """Check that ``state_dict`` provides exactly the weights of ``backbone``'s architecture.

    Every key of ``backbone.state_dict()`` must be present with the same shape,
    there must be no extra key,
    and when the weights carry an architecture record (``_extra_state``,
    written by :class:`ArchitectureCheckedLoading` models and the converter)
    it must equal ``backbone.architecture()``: that catches weights whose
    shapes happen to fit another configuration, e.g. base stride ``s`` 2
    versus 4.

    Args:
        backbone (nn.Module): The backbone that will receive the weights.
        state_dict (Mapping[str, Tensor]): Keys relative to the backbone (no
            ``backbone.`` prefix).
        source (str, optional): Where the weights come from, for the message.
            Defaults to None.

    Raises:
        BackboneCheckpointMismatchError: Naming the backbone's architecture,
            the differing options and the offending keys and shapes.

    Example:
        >>> from sar_backbones.models import SARResNet
        >>> r18 = SARResNet(depth=18)
        >>> check_backbone_state_dict(r18, r18.state_dict())  # passes
        >>> check_backbone_state_dict(SARResNet(depth=34), r18.state_dict())
        Traceback (most recent call last):
        ...
        BackboneCheckpointMismatchError: The weights do not fit ...
    """
    problems = []
    record = state_dict.get(EXTRA_STATE_KEY)
    if record is not None and hasattr(backbone, 'architecture'):
        arch = architecture_differences(backbone.architecture(), decode_architecture(record))
        if arch:
            problems.append(f'architecture differs: {arch}')
    weights = describe_mismatch(backbone, state_dict)
    if weights:
        problems.append(weights)
    if not problems:
        return
    origin = f' from {source}' if source else ''
    raise BackboneCheckpointMismatchError(
        f'The weights{origin} do not fit the backbone {describe_backbone(backbone)}: '
        f'{"; ".join(problems)}. They come from a network with another depth, group number '
        'G, base stride s, alpha/beta, stem or widths; use the checkpoint of a run whose '
        'backbone matches this config, or change the config to match the checkpoint.')


class ArchitectureCheckedLoading:
    """Mixin: an ``nn.Module`` that records its architecture and refuses weights of another.

    The class defines ``architecture() -> dict`` (plain values: the options
    that decide what each weight means). The mixin then

    * saves that record in every state dict as ``<prefix>_extra_state`` (a
      uint8 tensor, see :func:`encode_architecture`), so mmengine runner
      checkpoints, EMA copies and converted backbones carry it;
    * checks, whenever a state dict with keys of this module is loaded (by
      ``load_state_dict``, mmengine's ``load_checkpoint`` for ``test.py``,
      ``load_from`` and ``resume``, or ``Pretrained``), that the keys and
      shapes fit and the recorded architecture is this one, and raises
      :class:`BackboneCheckpointMismatchError` otherwise, even under
      mmengine's ``strict=False`` loading (which would only log it and keep
      random weights);
    * accepts older checkpoints without the record (keys and shapes only) and
      does not report the record as missing from them.

    A state dict with no key of this module (e.g. a head loaded alone) is
    left to the caller. Put the mixin before ``nn.Module`` in the bases.
    """

    def architecture(self) -> Dict[str, Any]:
        """The options that decide what each weight means (override)."""
        raise NotImplementedError(f'{type(self).__name__} must define architecture()')

    def get_extra_state(self) -> Tensor:
        """The architecture record saved as ``<prefix>_extra_state``."""
        return encode_architecture(self.architecture())

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore: the record was compared before loading."""

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              local_metadata: dict, strict: bool, missing_keys: list,
                              unexpected_keys: list, error_msgs: list) -> None:
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if own:
            check_backbone_state_dict(self, own)
        had_record = prefix + EXTRA_STATE_KEY in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore
                                      missing_keys, unexpected_keys, error_msgs)
        if not had_record and prefix + EXTRA_STATE_KEY in missing_keys:
            # A checkpoint written before the record existed: not an error.
            missing_keys.remove(prefix + EXTRA_STATE_KEY)


# --------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------


def load_pretrained(model: nn.Module, filename: str, prefix: Optional[str] = None,
                    map_location: Any = 'cpu') -> None:
    """Load ``filename`` into ``model`` strictly, failing with the differences.

    Args:
        model (nn.Module): Usually a ``SARResNet``.
        filename (str): A local file (read with :func:`load_checkpoint_file`)
            or a URL / ``open-mmlab://`` name (through mmengine).
        prefix (str, optional): Load the keys under this prefix, e.g.
            ``'backbone.'`` for an mmpretrain classifier checkpoint.
        map_location (optional): Same as :func:`torch.load`.

    Raises:
        CheckpointReadError: If the file cannot be read.
        BackboneCheckpointMismatchError: If the weights do not fit; nothing is
            loaded then.
    """
    if '://' in str(filename):
        from mmengine.runner.checkpoint import _load_checkpoint
        checkpoint = _load_checkpoint(filename, map_location=map_location)
    else:
        checkpoint = load_checkpoint_file(filename, map_location=map_location)
    state = extract_state_dict(checkpoint, prefix, source=str(filename))
    check_backbone_state_dict(model, state, source=str(filename))
    model.load_state_dict(state, strict=True)
