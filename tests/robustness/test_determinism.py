"""In eval mode the same input gives the same masks and outputs, every time, on both paths."""
import pytest
import torch

from sar_backbones.models import SARResNet
from tests.robustness.helpers import NARROW, eval_model, relative_error, run_paths


@pytest.fixture(scope='module')
def model():
    return eval_model(seed=4, patch_grid=(7, 4, 2))


def test_repeated_calls_are_bitwise_identical_on_both_paths(model):
    x = torch.randn(3, 3, 64, 80)
    first_dense, first_sparse = run_paths(model, x)
    # Another global RNG state and an unrelated batch in between change nothing:
    # evaluation draws no random numbers.
    torch.manual_seed(12345)
    run_paths(model, torch.randn(2, 3, 48, 48))
    rng = torch.get_rng_state()
    second_dense, second_sparse = run_paths(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    for first, second in ((first_dense, second_dense), (first_sparse, second_sparse)):
        for a, b in zip(first[0] + first[1], second[0] + second[1]):
            assert torch.equal(a, b)
    # Sparse and dense: the same masks, outputs within float32 rounding.
    assert all(torch.equal(a, b) for a, b in zip(first_dense[1], first_sparse[1]))
    for d, s in zip(first_dense[0], first_sparse[0]):
        assert relative_error(s, d) < 1e-4
    rates = model.get_activation_rates()
    assert 0 < float(rates.mean()) < 1 and rates.shape == (3, model.num_masked_blocks)


def test_masks_of_an_image_do_not_depend_on_its_batch(model):
    x = torch.randn(4, 3, 64, 80)
    with torch.no_grad():
        model(x)
        batched = [m.clone() for m in model.get_masks()]
        model(x.flip(0))
        flipped = model.get_masks()
        model(x[2:3])
        alone = model.get_masks()
    for b, f, a in zip(batched, flipped, alone):
        assert torch.equal(b, f.flip(0))
        assert torch.equal(b[2:3], a)


def test_a_rebuilt_model_and_reloaded_weights_reproduce_the_outputs(model):
    x = torch.randn(2, 3, 64, 80)
    reference = run_paths(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(999)  # another initialisation, then the same weights
    twin = SARResNet(**NARROW, patch_grid=(7, 4, 2)).eval()
    twin.load_state_dict(state)
    for (a_outs, a_masks), (b_outs, b_masks) in zip(reference, run_paths(twin, x)):
        for a, b in zip(a_outs + a_masks, b_outs + b_masks):
            assert torch.equal(a, b)

    # Loading other weights into a model that already ran sparsely (and cached its
    # BN-folded convolutions) gives the other model's outputs, not stale ones.
    other = eval_model(seed=5, patch_grid=(7, 4, 2))
    expected = run_paths(other, x)
    twin.load_state_dict(other.state_dict())
    got = run_paths(twin, x)
    for (a_outs, a_masks), (b_outs, b_masks) in zip(expected, got):
        for a, b in zip(a_outs + a_masks, b_outs + b_masks):
            assert torch.equal(a, b)
    assert relative_error(got[1][0][-1], reference[1][0][-1]) > 1e-2


def test_mask_override_is_reproducible_and_path_independent(model):
    x = torch.randn(2, 3, 64, 80)
    model.set_mask_override(0.3, seed=7)
    try:
        first = run_paths(model, x)
        torch.manual_seed(1)
        second = run_paths(model, x)
    finally:
        model.set_mask_override(None)
    for a, b in zip(first[1][1] + first[0][1], second[1][1] + second[0][1]):
        assert torch.equal(a, b)
    for d, s in zip(first[0][0], first[1][0]):
        assert relative_error(s, d) < 1e-4


def test_mask_override_follows_its_settings(model):
    """Drawn masks are kept between calls, but only for the rate and seed they were drawn for."""
    x = torch.randn(1, 3, 64, 80)
    drawn = {}
    try:
        for rate, seed in ((0.25, 0), (0.75, 0), (0.25, 1), (0.25, 0)):
            model.set_mask_override(rate, seed=seed)
            with torch.no_grad():
                model(x)
            masks = model.get_masks()
            for mask in masks:  # exactly round(rate * K) patches per image and group
                expected = round(rate * mask.shape[-2] * mask.shape[-1])
                assert torch.equal(mask.flatten(2).sum(-1), torch.full(mask.shape[:2], expected,
                                                                       dtype=mask.dtype))
            drawn.setdefault((rate, seed), []).append(torch.cat([m.flatten() for m in masks]))
            masks[0].zero_()  # a caller's edit must not reach the next forward
    finally:
        model.set_mask_override(None)
    first, again = drawn[(0.25, 0)]
    assert torch.equal(first, again)
    assert not torch.equal(first, drawn[(0.25, 1)][0])
