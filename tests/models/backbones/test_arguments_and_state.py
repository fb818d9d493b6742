"""Options are checked by name; modes, overrides and records are values the backbone owns."""
import math
import warnings

import pytest
import torch

from benchmarks.parts import part_macs, sar_parts
from sar_backbones.analysis import collect_masks, model_complexity
from sar_backbones.analysis.complexity import dense_cost
from sar_backbones.analysis.flops_stats import measure_rates
from sar_backbones.models import SARResNet
from sar_backbones.models.backbones.arguments import InvalidArgumentError
from sar_backbones.models.backbones.mask_override import random_patch_masks
from sar_backbones.models.layers.gumbel import (MAX_TEMPERATURE, MIN_TEMPERATURE,
                                                straight_through_gumbel)
from tests.robustness.helpers import NARROW, eval_model


def narrow(**kwargs):
    return SARResNet(**{**NARROW, **kwargs})


# --------------------------------------------------------------- constructor
@pytest.mark.parametrize('kwargs,named', [
    (dict(base_stride=2.0), 'base_stride'),
    (dict(base_stride=(2, 2)), 'base_stride'),
    (dict(base_stride='2'), 'base_stride'),
    (dict(out_indices=3), 'out_indices'),
    (dict(out_indices=(0, 0)), 'out_indices'),
    (dict(out_indices=(4, )), 'out_indices'),
    (dict(out_indices=(1.0, )), 'out_indices'),
    (dict(frozen_stages=1.0), 'frozen_stages'),
    (dict(frozen_stages=True), 'frozen_stages'),
    (dict(frozen_stages=5), 'frozen_stages'),
    (dict(in_channels=0), 'in_channels'),
    (dict(in_channels=3.0), 'in_channels'),
    (dict(stem_channels=0), 'stem_channels'),
    (dict(stem_channels=16.5), 'stem_channels'),
    (dict(base_channels=0), 'base_channels'),
    (dict(beta=math.inf), 'beta'),
    (dict(beta=math.nan), 'beta'),
    (dict(beta=0), 'beta'),
    (dict(alpha=2.0), 'alpha'),
    (dict(alpha=True), 'alpha'),
    (dict(mask_groups=0), 'mask_groups'),
    (dict(mask_groups=2.0), 'mask_groups'),
    (dict(mask_groups=3), 'mask_groups'),
    (dict(target_rate=0), 'target_rate'),
    (dict(target_rate=math.nan), 'target_rate'),
    (dict(target_rate='0.5'), 'target_rate'),
    (dict(rate_loss_weight=math.inf), 'rate_loss_weight'),
    (dict(rate_loss_weight=-1), 'rate_loss_weight'),
    (dict(temperature=math.inf), 'temperature'),
    (dict(temperature=1e-50), 'temperature'),
    (dict(temperature=1e9), 'temperature'),
    (dict(temperature=0), 'temperature'),
    (dict(strides=(1, 2, 2)), 'strides'),
    (dict(strides=(1, 2.0, 2, 2)), 'strides'),
    (dict(dilations=None), 'dilations'),
    (dict(patch_grid=(4, 4)), 'patch_grid'),
    (dict(patch_grid=0), 'patch_grid'),
    (dict(patch_size=(4, 4, 7.5)), 'patch_size'),
    (dict(patch_grid=4, patch_size=4), 'patch_grid'),
    (dict(patch_grid=None), 'patch_grid'),
    (dict(pretrained=0), 'pretrained'),
    (dict(rate_loss='mean'), 'rate_loss'),
    (dict(inference_mode='fast'), 'inference_mode'),
    (dict(norm_cfg='BN'), 'norm_cfg'),
    (dict(conv_cfg='Conv'), 'conv_cfg'),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_wrong_option_is_refused_by_name(kwargs, named):
    with pytest.raises(InvalidArgumentError, match=named):
        narrow(**kwargs)


def test_invalid_argument_error_is_both_value_and_type_error():
    with pytest.raises(ValueError):
        narrow(beta=math.inf)
    with pytest.raises(TypeError):
        narrow(base_stride=2.0)


@pytest.mark.parametrize('depth', [20, '18', 18.0, True, None])
def test_depth_outside_the_table_is_a_key_error_naming_it(depth):
    with pytest.raises(KeyError, match='invalid depth'):
        narrow(depth=depth)


def test_weight_standardised_convs_are_refused_for_sparse_inference_only():
    ws = dict(type='ConvWS')
    with pytest.raises(InvalidArgumentError,
                       match=r"conv_cfg type 'ConvWS'.*inference_mode='dense'"):
        narrow(conv_cfg=ws)
    model = narrow(conv_cfg=ws, inference_mode='dense').eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(InvalidArgumentError, match='ConvWS'):
        model.set_inference_mode('sparse')
    assert model.inference_mode == 'dense'


def test_group_norm_that_cannot_split_the_selector_names_the_selector():
    gn = dict(type='GN', num_groups=32, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match=r'region selectors.*4 x G = 8 channels.*'
                                                   r'num_groups=32'):
        narrow(norm_cfg=gn, inference_mode='dense')


def test_patch_size_alone_works():
    model = narrow(patch_size=(4, 4, 7)).eval()
    assert model.patch_grid is None and model.patch_size == (4, 4, 7)
    with torch.no_grad():
        model(torch.rand(1, 3, 72, 88))
    assert model.get_masks()[0].shape[-2:] == (5, 6)  # ceil(18 / 4) x ceil(22 / 4)
    assert narrow().patch_grid == (14, 7, 2)


def test_stem_channels_none_follows_base_channels():
    model = SARResNet(depth=18, stem_channels=None, base_channels=16)
    assert model.conv1.out_channels == 16


def test_mask_groups_and_its_deprecated_alias():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert narrow(mask_groups=4).mask_groups == 4
    with pytest.warns(DeprecationWarning, match='mask_groups'):
        model = narrow(groups=4)
    assert model.mask_groups == model.groups == 4
    with pytest.raises(InvalidArgumentError, match='differ'):
        narrow(groups=2, mask_groups=4)
    assert narrow().mask_groups == 2


def test_setters_validate():
    model = narrow()
    for bad in (math.inf, math.nan, 0, -1, 1e-50, 1e9, '1'):
        with pytest.raises(ValueError, match='temperature'):
            model.set_temperature(bad)
    model.set_temperature(MIN_TEMPERATURE)
    model.set_temperature(MAX_TEMPERATURE)
    for bad in (0, 1.5, math.nan, None):
        with pytest.raises(ValueError, match='target_rate'):
            model.set_target_rate(bad)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match='noise scale'):
            model.set_noise_scale(bad)
    for bad in (-0.1, 1.1, math.nan, '0.5'):
        with pytest.raises(ValueError, match='override rate'):
            model.set_mask_override(bad)
    with pytest.raises(ValueError, match='seed'):
        model.set_mask_override(0.5, seed=-1)


def test_empty_training_batch_is_a_clear_error():
    model = narrow(patch_grid=(4, 2, 1)).train()
    with pytest.raises(ValueError, match='training batch of 0 images'):
        model(torch.rand(0, 3, 32, 32))


# ------------------------------------------------------------------- Gumbel
@pytest.mark.parametrize('tau', [MIN_TEMPERATURE, 1e-2, 1.0, 1e2, MAX_TEMPERATURE])
def test_gumbel_sample_does_not_depend_on_the_temperature(tau):
    """Gumbel-max: P(keep) = sigmoid(margin) at every tau (the old 0.5 threshold of
    sigmoid(margin / tau) skipped everything at a large tau)."""
    margin = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    keep = margin.repeat(20000, 1).requires_grad_()
    skip = torch.zeros_like(keep, requires_grad=True)
    sample = straight_through_gumbel(keep, skip, tau,
                                     generator=torch.Generator().manual_seed(0))
    (sample * torch.arange(1., 5.)).sum().backward()
    assert torch.allclose(sample.mean(0), torch.sigmoid(margin), atol=0.015)
    assert torch.isfinite(keep.grad).all() and torch.isfinite(skip.grad).all()
    assert keep.grad.abs().sum() > 0 or tau == MAX_TEMPERATURE


def test_gumbel_without_noise_is_the_inference_decision():
    keep = torch.tensor([1.0, -1.0, 0.0, 1e-6])
    skip = torch.zeros(4)
    sample = straight_through_gumbel(keep, skip, MAX_TEMPERATURE, noise_scale=0.0)
    assert sample.tolist() == (keep > skip).float().tolist()


def test_gumbel_refuses_a_temperature_out_of_range():
    with pytest.raises(ValueError, match='temperature'):
        straight_through_gumbel(torch.zeros(2), torch.zeros(2), 1e-50)


# ----------------------------------------------------------- mask override
def test_random_patch_masks_are_exact_seeded_and_differ_per_block():
    shape = torch.Size((3, 2, 7, 5))
    a = random_patch_masks(shape, 0.4, seed=1, block=0, device=torch.device('cpu'),
                           dtype=torch.float32)
    assert a.shape == shape and set(a.unique().tolist()) <= {0.0, 1.0}
    assert (a.flatten(2).sum(-1) == round(0.4 * 35)).all()
    same = random_patch_masks(shape, 0.4, 1, 0, torch.device('cpu'), torch.float32)
    assert torch.equal(a, same)
    for other in (random_patch_masks(shape, 0.4, 2, 0, torch.device('cpu'), torch.float32),
                  random_patch_masks(shape, 0.4, 1, 1, torch.device('cpu'), torch.float32)):
        assert not torch.equal(a, other)
    assert not torch.equal(a[0], a[1])  # images differ too


# ------------------------------------------------ modes and records as values
def _state(model):
    return (model.training, [m.training for m in model.modules()], model.inference_mode,
            model._mask_override, model.out_indices, model.last_forward)


def test_temporary_settings_restore_everything_even_after_an_error():
    model = eval_model(frozen_stages=1).train()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    before = _state(model)
    with pytest.raises(RuntimeError, match='boom'):
        with model.temporary_settings(training=False, inference_mode='dense', mask_rate=0.25,
                                      out_indices=(3, )):
            with torch.no_grad():
                model(torch.rand(1, 3, 64, 64))
            assert not model.training and model.inference_mode == 'dense'
            raise RuntimeError('boom')
    assert _state(model) == before


def _rate_after(model, x):
    with torch.no_grad():
        model(x)
    return model.get_activation_rates()


@pytest.mark.parametrize('analysis', ['model_complexity', 'dense_cost', 'collect_masks',
                                      'measure_rates', 'part_macs'])
def test_analysis_functions_leave_the_model_as_they_found_it(analysis):
    """set_mask_override(0.25) then an analysis function: the next forward still runs at 0.25."""
    model = eval_model()
    x = torch.rand(1, 3, 64, 64)
    model.set_mask_override(0.25, seed=3)
    expected = _rate_after(model, x)
    masks = model.get_masks()
    before = _state(model)
    if analysis == 'model_complexity':
        model_complexity(model, (3, 64, 64), activation_rate=0.5)
    elif analysis == 'dense_cost':
        dense_cost(model, (3, 64, 64))
    elif analysis == 'collect_masks':
        collect_masks(model, x, rate=0.75)
    elif analysis == 'measure_rates':
        measure_rates(model, [('a', x)])
    else:
        part_macs(model, sar_parts(model), (3, 64, 64), rate=0.5)
    assert _state(model) == before
    assert all(torch.equal(a, b) for a, b in zip(model.get_masks(), masks))
    assert torch.equal(_rate_after(model, x), expected)
    assert torch.allclose(expected, torch.full_like(expected, 0.25), atol=0.13)


def test_override_masks_are_not_redrawn_when_the_override_is_set_again():
    model = eval_model()
    x = torch.rand(1, 3, 64, 64)
    model.set_mask_override(0.5, seed=0)
    with torch.no_grad():
        model(x)
    cached = dict(model._override_masks)
    for rate in (0.2, 0.5):  # as the latency benchmark's interleaved cases do
        model.set_mask_override(rate, seed=0)
        with torch.no_grad():
            model(x)
    assert all(model._override_masks[key] is mask for key, mask in cached.items())


def test_record_is_replaced_in_one_step():
    model = eval_model()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
    record = model.last_forward
    assert len(record.masks) == model.num_masked_blocks and record.input_finite is None
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert model.last_forward is not record and record.masks[0].shape[0] == 2
    assert model.get_activation_rates().shape == (1, model.num_masked_blocks)
