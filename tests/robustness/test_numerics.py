"""Numerical safety: Gumbel sampling stays finite, a broken rate loss is reported."""
import pytest
import torch

from sar_backbones.models import SARResNet
from sar_backbones.models.layers import RegionSelector, straight_through_gumbel
from tests.robustness.helpers import NARROW, partial_selectors

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _extreme_logits(dtype):
    big = torch.finfo(dtype).max / 2
    keep = torch.tensor([big, -big, 0.0, 1e-3, big, -big, 3.0, -3.0], dtype=dtype)
    skip = torch.tensor([-big, big, 0.0, 0.0, big, -big, -3.0, 3.0], dtype=dtype)
    return keep.requires_grad_(), skip.requires_grad_()


@pytest.mark.parametrize('dtype', LOW_PRECISION)
@pytest.mark.parametrize('tau', [1e-4, 1.0])
def test_gumbel_with_extreme_logits_under_autocast(dtype, tau):
    keep, skip = _extreme_logits(dtype)
    with torch.autocast('cpu', dtype=dtype):
        sample = straight_through_gumbel(keep, skip, tau)
        (sample * torch.arange(1., 9.)).sum().backward()
    assert sample.dtype == torch.float32  # sampled in float32 whatever autocast says
    assert set(sample.tolist()) <= {0.0, 1.0}
    # A margin of half the dtype's range decides whatever the noise.
    assert sample[0] == 1 and sample[1] == 0
    for grad in (keep.grad, skip.grad):
        assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize('dtype', LOW_PRECISION)
def test_gumbel_noise_finite_at_the_ends_of_the_uniform_range(monkeypatch, dtype):
    """u = 0 and u -> 1 give -log(-log(u)) = -inf / +inf without the float32 clamp."""
    real_rand = torch.rand
    ends = torch.tensor([0.0, 1.0 - 2**-24, torch.finfo(torch.float32).tiny, 0.5])

    def extreme_rand(*size, **kwargs):
        kwargs.pop('generator', None)
        out = real_rand(*size, **kwargs)
        flat = out.view(-1)
        flat.copy_(ends.repeat(flat.numel() // 4 + 1)[:flat.numel()])
        return out

    monkeypatch.setattr(torch, 'rand', extreme_rand)
    keep = torch.zeros(2, 3, 5, dtype=dtype, requires_grad=True)
    skip = torch.zeros(2, 3, 5, dtype=dtype, requires_grad=True)
    with torch.autocast('cpu', dtype=dtype):
        sample = straight_through_gumbel(keep, skip, 1e-4)
        sample.sum().backward()
    assert torch.isfinite(sample).all() and set(sample.unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(keep.grad).all() and torch.isfinite(skip.grad).all()


@pytest.mark.parametrize('dtype', LOW_PRECISION)
def test_training_step_under_autocast_with_tiny_tau(dtype):
    torch.manual_seed(0)
    # Logits of both signs in the hundreds: far beyond the float16 range after 1/tau.
    model = partial_selectors(SARResNet(**NARROW, patch_grid=None, patch_size=(4, 4, 7),
                                        temperature=1e-4), std=300.0).train()
    with torch.autocast('cpu', dtype=dtype):
        outs = model(torch.randn(4, 3, 40, 56))
        losses = model.get_aux_losses()
        task = sum(o.float().square().mean() for o in outs)
    (task + losses['loss_act_rate']).backward()
    assert all(torch.isfinite(o).all() for o in outs)
    masks = model.get_masks()
    assert all(m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
               for m in masks)
    assert 0 < float(losses['act_rate']) < 1
    assert losses['loss_act_rate'].dtype == torch.float32
    assert torch.isfinite(losses['loss_act_rate'])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_input_in_training_is_reported_not_trained_on(bad):
    torch.manual_seed(0)
    model = SARResNet(**NARROW, patch_grid=(4, 2, 1)).train()
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 5, 7] = bad
    model(x)
    # NaN logits propagate into the sampled masks instead of silently meaning "skip".
    assert not torch.isfinite(model.get_activation_rates()).all()
    with pytest.raises(FloatingPointError, match=('contains NaN or inf, so every region mask '
                                                  'was sampled from NaN logits')):
        model.get_aux_losses()
    # A clean batch afterwards trains normally.
    model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(model.get_aux_losses()['loss_act_rate'])
    # At inference NaN logits would silently mean "refine nothing": an error
    # that names the selector, on the sparse and the dense path alike. (A fresh
    # model: the NaN batch above also poisoned the BatchNorm running statistics.)
    model = SARResNet(**NARROW, patch_grid=(4, 2, 1)).eval()
    for mode in ('sparse', 'dense'):
        model.set_inference_mode(mode)
        with torch.no_grad(), pytest.raises(FloatingPointError,
                                            match=r'layer1\.selectors\.0 .*non-finite'):
            model(x)
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        assert 'loss_act_rate' not in model.get_aux_losses()


def test_nan_rate_loss_raises_floating_point_error():
    torch.manual_seed(0)
    model = SARResNet(**NARROW, patch_grid=(4, 2, 1)).train()
    selector = next(m for m in model.modules() if isinstance(m, RegionSelector))
    # Stands for masks that carry a NaN (e.g. from NaN logits).
    handle = selector.register_forward_hook(lambda module, args, mask: mask * float('nan'))
    model(torch.randn(2, 3, 32, 32))
    handle.remove()
    with pytest.raises(FloatingPointError,
                       match=r'the activation-rate loss is nan \(rates finite: False\)'):
        model.get_aux_losses()


def test_task_model_stops_before_the_optimizer_step():
    """Through a task model's loss(): the error surfaces before anything is updated."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import init_default_scope
    from mmpretrain.structures import DataSample

    from sar_backbones.registry import MODELS

    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='sar_backbones.SARImageClassifier',
        backbone=dict(type='sar_backbones.SARResNet', **NARROW, patch_grid=(4, 2, 1),
                      out_indices=(3, )),
        neck=dict(type='mmpretrain.GlobalAveragePooling'),
        head=dict(type='mmpretrain.LinearClsHead', num_classes=3, in_channels=128)))
    model.train()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    images = torch.rand(2, 3, 32, 32) * 255
    images[0, 1, 3, 3] = float('nan')
    data = dict(inputs=list(images), data_samples=[DataSample().set_gt_label(i) for i in (0, 1)])
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' not in k}
    with pytest.raises(FloatingPointError, match='NaN or inf'):
        model.train_step(data, wrapper)
    for key, value in before.items():
        if 'num_batches_tracked' not in key:
            assert torch.equal(model.state_dict()[key], value), key
