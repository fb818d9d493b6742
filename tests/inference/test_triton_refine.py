"""The Triton refine kernels (the CUDA sparse path) against the PyTorch implementation.

On a machine without a GPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors), in a subprocess because Triton reads
the variable when the kernels are defined. The CUDA tests (CUDA graph capture,
fp16) skip without a device.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sar_backbones.inference import native, triton_refine
from tests.inference.helpers import NARROW_50, assert_close, deployed_copy, eval_model, forward

REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture(autouse=True)
def restore_kernel_choice():
    yield
    native.set_refine_kernel(None)


def test_interpreted_kernels_equal_the_pytorch_implementation():
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, '-m', 'tests.inference.triton_interpreted'],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 8
    for case, error in errors.items():
        assert error < 1e-5, (case, error)


def test_triton_choice_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available() or triton_refine.interpreted():
        pytest.skip('the Triton kernels can run here')
    model = deployed_copy(eval_model())
    native.set_refine_kernel('triton')
    with pytest.raises(RuntimeError, match='SAR_REFINE_KERNEL=triton.*CUDA'):
        forward(model, torch.randn(1, 3, 64, 64))


@needs_cuda
@pytest.mark.parametrize('dtype', [None, torch.float16])
def test_cuda_sparse_equals_dense(dtype):
    model = deployed_copy(eval_model(**NARROW_50)).cuda()
    x = torch.randn(1, 3, 67, 93, device='cuda')
    with torch.autocast('cuda', dtype=dtype or torch.float16, enabled=dtype is not None):
        dense, _ = forward(model, x, 'dense')
        sparse, _ = forward(model, x, 'sparse')
    assert_close(sparse, dense, 1e-4 if dtype is None else 2e-2)


@needs_cuda
def test_cuda_graph_replays_new_images_with_new_masks():
    """No host sync in the sparse forward: a captured graph serves images it never saw."""
    model = deployed_copy(eval_model(**NARROW_50)).cuda()
    model.set_inference_mode('sparse')
    static = torch.randn(1, 3, 96, 128, device='cuda')
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        outs = model(static)
    for seed in range(3):
        image = torch.randn(1, 3, 96, 128, device='cuda',
                            generator=torch.Generator('cuda').manual_seed(seed))
        static.copy_(image)
        graph.replay()
        expected, _ = forward(model, image, 'dense')
        assert_close([o.clone() for o in outs], expected)
