"""SAR-ResNet on a CUDA device: the same function as on the CPU, sparse or dense, trained or not.

Skipped where no GPU is visible (CI has none); `make test` on a GPU machine runs
them. TF32 is switched off so that float32 results can be compared closely.
"""
import copy

import pytest
import torch

from tools.analysis.model_builders import build_preset_backbone
from .helpers import randomize_norms, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

CUDA = torch.device('cuda')


@pytest.fixture(autouse=True)
def exact_float32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _backbone(depth: int, **overrides):
    torch.manual_seed(0)
    return randomize_norms(build_preset_backbone(f'sar-resnet{depth}-g2s2a2b1', **overrides))


def _image(size=(96, 96), batch=2, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _run(model, x, mode):
    model.set_inference_mode(mode)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('rate', [0.0, 0.3, 0.5, None])
def test_sparse_path_equals_dense_path_on_cuda(depth, rate):
    model = _backbone(depth).to(CUDA)
    model.set_mask_override(rate)
    x = _image().to(CUDA)
    dense, sparse = _run(model, x, 'dense'), _run(model, x, 'sparse')
    for d, s in zip(dense, sparse):
        assert s.device.type == 'cuda' and s.is_contiguous()
        assert relative_error(s, d) < 1e-5


def test_cuda_computes_what_the_cpu_computes():
    cpu_model = _backbone(50)
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    x = _image()
    # Learned masks (every patch at init, see RegionSelector) and random ones.
    for rate in (None, 0.4):
        cpu_model.set_mask_override(rate)
        cuda_model.set_mask_override(rate)
        expected = _run(cpu_model, x, 'sparse')
        actual = _run(cuda_model, x.to(CUDA), 'sparse')
        for a, e in zip(actual, expected):
            assert relative_error(a.cpu(), e) < 1e-5
        for a, e in zip(cuda_model.get_masks(), cpu_model.get_masks()):
            assert torch.equal(a.cpu(), e)


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    outs = model(x)
    aux = model.get_aux_losses()
    loss = sum(out.square().mean() for out in outs) + aux['loss_act_rate']
    loss.backward()
    return outs, aux, {name: p.grad for name, p in model.named_parameters()}


def test_training_step_on_cuda_matches_the_cpu():
    """Gumbel noise off (deterministic masks, relaxed gradients): same outputs and gradients."""
    cpu_model = _backbone(18, target_rate=0.5).train()
    cpu_model.set_noise_scale(0.)
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    x = _image()
    cpu_outs, cpu_aux, cpu_grads = _train_step(cpu_model, x)
    cuda_outs, cuda_aux, cuda_grads = _train_step(cuda_model, x.to(CUDA))
    for a, e in zip(cuda_outs, cpu_outs):
        assert relative_error(a.detach().cpu(), e.detach()) < 1e-4
    assert cuda_aux['loss_act_rate'].item() == pytest.approx(cpu_aux['loss_act_rate'].item(),
                                                             rel=1e-5)
    selector_grads = [name for name in cpu_grads if '.selectors.' in name]
    assert selector_grads, 'the rate loss reaches the region selectors'
    for name, expected in cpu_grads.items():
        actual = cuda_grads[name]
        assert (actual is None) == (expected is None), name
        if expected is not None:
            assert torch.isfinite(actual).all(), name
            assert relative_error(actual.cpu(), expected) < 1e-3, name
    assert any(cuda_grads[name].abs().sum() > 0 for name in selector_grads)


def test_gumbel_training_step_on_cuda():
    model = _backbone(50, target_rate=0.5).train().to(CUDA)
    outs, aux, grads = _train_step(model, _image().to(CUDA))
    for mask in model.get_masks():
        assert mask.device.type == 'cuda'
        assert torch.equal(mask, mask.round())  # hard 0/1 in the forward
    assert 0 <= aux['act_rate'].item() <= 1
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())


# Relative error of a whole output map, as in the CPU autocast test
# (tests/robustness/test_inputs.py): bf16 keeps 8 mantissa bits, fp16 11.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_on_cuda(dtype):
    model = _backbone(18).to(CUDA)
    model.set_mask_override(0.5)  # fixed masks: rounding cannot flip a decision
    x = _image().to(CUDA)
    reference = _run(model, x, 'dense')
    with torch.autocast('cuda', dtype=dtype):
        dense, sparse = _run(model, x, 'dense'), _run(model, x, 'sparse')
    for d, s, r in zip(dense, sparse, reference):
        assert torch.isfinite(s).all()
        assert relative_error(s.float(), d.float()) < TOLERANCE[dtype]
        assert relative_error(s.float(), r) < TOLERANCE[dtype]
    # training under autocast: finite loss and gradients
    model.train()
    with torch.autocast('cuda', dtype=dtype):
        _, aux, grads = _train_step(model, x)
    assert torch.isfinite(aux['loss_act_rate'])
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())


def test_channels_last_on_cuda():
    model = _backbone(50).to(CUDA)
    model.set_mask_override(0.5)
    x = _image().to(CUDA)
    expected = _run(model, x, 'sparse')
    actual = _run(model.to(memory_format=torch.channels_last),
                  x.contiguous(memory_format=torch.channels_last), 'sparse')
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-5


def test_detection_size_input_on_cuda():
    """Fixed-size patches (the detection configs' patch_size) on a non-square input."""
    model = _backbone(50, patch_grid=None, patch_size=(4, 4, 7)).to(CUDA)
    model.set_mask_override(0.5)
    x = _image(size=(200, 304), batch=1).to(CUDA)
    dense, sparse = _run(model, x, 'dense'), _run(model, x, 'sparse')
    for d, s in zip(dense, sparse):
        assert relative_error(s, d) < 1e-5
