"""Strict loading of pretrained backbone weights."""
from collections import OrderedDict
from typing import Dict, Optional

import torch.nn as nn
from mmengine.runner.checkpoint import _load_checkpoint
from torch import Tensor

_MAX_LISTED = 8


def extract_state_dict(checkpoint: dict, prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """The model weights of an mmengine/mmpretrain checkpoint, optionally under ``prefix``."""
    state = checkpoint.get('state_dict', checkpoint)
    state = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                        for k, v in state.items())
    if prefix:
        if not prefix.endswith('.'):
            prefix += '.'
        selected = OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
        if not selected:
            raise ValueError(f'no weights under prefix {prefix!r} in the checkpoint '
                             f'(its keys start like {list(state)[:3]})')
        state = selected
    return state


def describe_mismatch(model: nn.Module, state: Dict[str, Tensor]) -> str:
    """Human-readable difference between a model and a state dict ('' when they match)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}'
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    lines = []
    for title, items in (('missing in checkpoint', missing),
                         ('not in model', unexpected), ('shape mismatch', shapes)):
        if items:
            listed = ', '.join(items[:_MAX_LISTED])
            more = f' ... and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
            lines.append(f'{len(items)} {title}: {listed}{more}')
    return '; '.join(lines)


def load_pretrained(model: nn.Module, filename: str, prefix: Optional[str] = None,
                    map_location: str = 'cpu') -> None:
    """Load ``filename`` into ``model``, failing with the differing keys and shapes."""
    state = extract_state_dict(_load_checkpoint(filename, map_location=map_location), prefix)
    problem = describe_mismatch(model, state)
    if problem:
        raise ValueError(f'checkpoint {filename} does not match {type(model).__name__}'
                         f'{getattr(model, "depth", "")}: {problem}')
    model.load_state_dict(state, strict=True)
