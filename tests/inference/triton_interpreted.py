"""Checks of the Triton refine kernels run by Triton's interpreter on the CPU (no GPU needed).

Run as a script by ``test_triton_refine.py`` with ``TRITON_INTERPRET=1`` set
before Triton is imported; prints one JSON line of relative errors.
"""
import json
import os
import sys

assert os.environ.get('TRITON_INTERPRET') == '1', 'run with TRITON_INTERPRET=1'

import torch  # noqa: E402

from sar_backbones.inference import native, triton_refine  # noqa: E402
from sar_backbones.inference.sparse import refine_stage  # noqa: E402
from tests.inference.helpers import (OS8, deployed_copy, eval_model, force_selection,  # noqa: E402
                                     forward, relative_error)


def _conv(cout: int, cin_per_group: int, size: int):
    return torch.randn(cout, cin_per_group, size, size) * 0.3, torch.randn(cout) * 0.1


def stage_case(kind: str, groups: int = 2, size=(11, 13), grid=(3, 4), dilation: int = 1,
               rate: float = 0.5, cardinality: int = 1) -> float:
    """Two refine blocks (projection + identity shortcut) against the PyTorch implementation."""
    weights, biases, shortcuts, last_relus = [], [], [], []
    if kind == 'bottleneck':
        cin, mid, cout, per_block = 16, 8 * cardinality, 32, 3
        for block in range(2):
            c_in = cin if block == 0 else cout
            convs = [_conv(mid, c_in // groups, 1), _conv(mid, mid // (groups * cardinality), 3),
                     _conv(cout, mid // groups, 1)]
            if block == 0:
                convs.append(_conv(cout, c_in, 1))
            weights += [w for w, _ in convs]
            biases += [b for _, b in convs]
            shortcuts.append(int(block == 0))
            last_relus.append(1)
    else:  # BasicBlock: the first convolution is a 3x3 on the block input
        cin, per_block = 16, 2
        for block in range(2):
            convs = [_conv(cin, cin // groups, 3), _conv(cin, cin // groups, 3)]
            weights += [w for w, _ in convs]
            biases += [b for _, b in convs]
            shortcuts.append(0)
            last_relus.append(int(block == 0))
    x = torch.randn(2, cin, *size)
    masks = (torch.rand(2, 2, groups, *grid) < rate).float()
    expected = refine_stage(x, masks, weights, biases, per_block, shortcuts, last_relus, dilation)
    actual = triton_refine.refine_stage(x, masks, weights, biases, per_block, shortcuts,
                                        last_relus, dilation)
    assert actual.shape == expected.shape
    return relative_error(actual, expected)


def model_case(selection: str, **kwargs) -> float:
    """A deployed SAR-ResNet's sparse forward through the Triton kernels against dense."""
    model = eval_model(**kwargs)
    if selection in ('all', 'none'):
        force_selection(model, keep=selection == 'all')
    model = deployed_copy(model)
    x = torch.randn(1, 3, 61, 77)
    dense, _ = forward(model, x, 'dense')
    native.set_refine_kernel('triton')
    sparse, _ = forward(model, x, 'sparse')
    native.set_refine_kernel(None)
    return max(relative_error(a, e) for a, e in zip(sparse, dense))


if __name__ == '__main__':
    torch.manual_seed(0)
    errors = {
        'bottleneck': stage_case('bottleneck'),
        'basic_g1_one_pixel_patches': stage_case('basic', groups=1, size=(7, 9), grid=(7, 9)),
        'bottleneck_dilation2': stage_case('bottleneck', grid=(2, 3), dilation=2),
        'resnext_cardinality2': stage_case('bottleneck', cardinality=2),
        'all_selected': stage_case('bottleneck', rate=1.0),
        'none_selected': stage_case('bottleneck', rate=0.0),
        'model_r18_learned': model_case('learned'),
        'model_r18_os8_all': model_case('all', **OS8),
    }
    print(json.dumps(errors))
    sys.exit(0)
