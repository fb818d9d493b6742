"""The region selectors of a stage, run together at inference (``RegionSelectors``)."""
import pytest
import torch
import torch.nn as nn

from sar_backbones.models.layers import RegionSelector, RegionSelectors
from tests.models.helpers import randomize_norms


def _selectors(num: int, channels: int, groups: int, seed: int) -> RegionSelectors:
    torch.manual_seed(seed)
    selectors = RegionSelectors(RegionSelector(channels, groups) for _ in range(num))
    randomize_norms(selectors, seed=seed)
    for selector in selectors:  # decisive logits that vary over patches and groups
        nn.init.normal_(selector.fc.weight, std=1.0)
        nn.init.normal_(selector.fc.bias, std=0.5)
    return selectors.eval()


@pytest.mark.parametrize('num,groups,grid', [(1, 1, (4, 4)), (3, 2, (4, 3)), (5, 4, (2, 2))])
def test_stacked_selection_equals_each_selector(num, groups, grid):
    selectors = _selectors(num, channels=16, groups=groups, seed=num)
    features = [torch.randn(2, 16, 12, 10) for _ in range(num)]
    assert selectors.can_stack()
    with torch.no_grad():
        masks = selectors(features, grid, tau=1.0)
        # Reference: each selector's own logits (unfolded BN, its own grouped convs).
        logits = [selector.logits(feature, grid) for selector, feature in zip(selectors, features)]
    assert len(masks) == num
    compared = 0
    for mask, logit in zip(masks, logits):
        assert mask.shape == (2, groups, *grid)
        skip, keep = logit.unbind(dim=2)
        decisive = (keep - skip).abs() > 1e-4  # float rounding of the folded norm
        assert torch.equal(mask[decisive], (keep > skip).float()[decisive])
        compared += int(decisive.sum())
    assert compared > 0.95 * num * 2 * groups * grid[0] * grid[1]
    assert 0 < float(torch.stack([m.mean() for m in masks]).mean()) < 1


def test_stacked_weights_follow_weight_updates():
    selectors = _selectors(2, channels=8, groups=2, seed=0)
    features = [torch.randn(1, 8, 8, 8) for _ in range(2)]
    with torch.no_grad():
        before = selectors(features, (4, 4), tau=1.0)
        # Swap keep and skip of the second selector: every decision flips.
        fc = selectors[1].fc
        fc.weight.copy_(fc.weight.view(2, 2, -1).flip(1).view_as(fc.weight))
        fc.bias.copy_(fc.bias.view(2, 2).flip(1).flatten())
        after = selectors(features, (4, 4), tau=1.0)
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[1], 1 - before[1])


def test_modules_run_one_by_one_when_stacking_cannot_stand_in():
    selectors = _selectors(2, channels=8, groups=2, seed=0)
    features = [torch.randn(1, 8, 8, 8) for _ in range(2)]
    assert not selectors.train().can_stack()  # training samples per selector

    selectors.eval()
    calls = []
    handle = selectors[1].conv.register_forward_hook(lambda *_: calls.append(1))
    assert not selectors.can_stack()  # a hook (e.g. a FLOPs counter) must see its module run
    with torch.no_grad():
        hooked = selectors(features, (4, 4), tau=1.0)
    handle.remove()
    assert calls == [1] and selectors.can_stack()
    with torch.no_grad():
        stacked = selectors(features, (4, 4), tau=1.0)
    assert all(torch.equal(a, b) for a, b in zip(hooked, stacked))

    group_norm = RegionSelectors([RegionSelector(8, 2, norm_cfg=dict(type='GN', num_groups=2))])
    assert not group_norm.eval().can_stack()  # only BatchNorm folds
    assert group_norm(features[:1], (4, 4), tau=1.0)[0].shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match='2 region selectors got 1 features'):
        selectors(features[:1], (4, 4), tau=1.0)


def test_large_maps_are_not_copied_into_one_stack(monkeypatch):
    from sar_backbones.models.layers import region_selection
    selectors = _selectors(2, channels=8, groups=2, seed=1)
    features = [torch.randn(1, 8, 8, 8) for _ in range(2)]
    stacked_calls = []
    original = RegionSelectors._stacked_forward
    monkeypatch.setattr(RegionSelectors, '_stacked_forward',
                        lambda self, *a: stacked_calls.append(1) or original(self, *a))
    with torch.no_grad():
        small = selectors(features, (4, 4), tau=1.0)
        assert stacked_calls == [1]
        monkeypatch.setattr(region_selection, '_STACK_MAX_BYTES', 2 * 8 * 8 * 8 * 4 - 1)
        large = selectors(features, (4, 4), tau=1.0)
    assert stacked_calls == [1]  # one byte over the limit: one selector at a time
    assert all(torch.equal(a, b) for a, b in zip(small, large))


def test_weights_stacked_under_inference_mode_serve_autograd_later():
    """An eval forward with gradients (e.g. a saliency map) after one under inference_mode."""
    selectors = _selectors(2, channels=8, groups=2, seed=2)
    features = [torch.randn(1, 8, 8, 8) for _ in range(2)]
    with torch.inference_mode():
        expected = selectors(features, (4, 4), tau=1.0)
    tracked = [feature.clone().requires_grad_(True) for feature in features]
    masks = selectors(tracked, (4, 4), tau=1.0)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected))
