"""The masked, grouped residual block against an explicit per-group reference."""
import pytest
import torch
import torch.nn.functional as F

from sar_backbones.models.layers import BasicBlock, Bottleneck, expand_mask
from sar_backbones.models.layers.masking import nearest_source_index, nearest_upsample
from tests.models.helpers import randomize_norms, relative_error


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def reference_refine_block(block, x, patch_mask):
    """Eq. 3 written out group by group: mask the input and each hidden activation."""
    groups = block.groups
    size = x.shape[-2:]
    rows = torch.arange(size[0]) * patch_mask.shape[-2] // size[0]
    cols = torch.arange(size[1]) * patch_mask.shape[-1] // size[1]
    pixel = patch_mask[:, :, rows][:, :, :, cols]  # (B, G, H, W)
    outputs = []
    pairs = block.convs_and_norms
    for g in range(groups):
        m = pixel[:, g:g + 1]
        out = x.chunk(groups, dim=1)[g]
        for i, (conv, norm) in enumerate(pairs):
            w = conv.weight.chunk(groups, dim=0)[g]
            out = F.conv2d(out * m, w, padding=conv.padding, dilation=conv.dilation)
            if i == len(pairs) - 1:
                out = out * m  # every conv stays inside the selection
            bn_slice = torch.nn.BatchNorm2d(w.shape[0]).eval()
            for name in ('weight', 'bias', 'running_mean', 'running_var'):
                getattr(bn_slice, name).data.copy_(getattr(norm, name).chunk(groups)[g])
            out = bn_slice(out)
            if i < len(pairs) - 1:
                out = out.relu()
        outputs.append(out)
    identity = x if block.shortcut is None else block.shortcut(x)
    out = torch.cat(outputs, dim=1) + identity
    return out.relu() if block.last_relu else out


@pytest.mark.parametrize('block_type,in_ch,out_ch', [(Bottleneck, 64, 256), (Bottleneck, 256, 256),
                                                     (BasicBlock, 64, 128), (BasicBlock, 64, 64)])
@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('last_relu', [True, False])
def test_masked_block_matches_reference(block_type, in_ch, out_ch, groups, last_relu):
    torch.manual_seed(0)
    block = randomize_norms(block_type(in_ch, out_ch, groups=groups, last_relu=last_relu)).eval()
    x = torch.randn(2, in_ch, 13, 17)
    patch_mask = (torch.rand(2, groups, 4, 5) > 0.5).float()
    with torch.no_grad():
        actual = block(x, expand_mask(patch_mask, x.shape[-2:]))
        expected = reference_refine_block(block, x, patch_mask)
    assert relative_error(actual, expected) < 1e-5


def test_unselected_pixels_get_shortcut_plus_bn_shift():
    torch.manual_seed(0)
    block = randomize_norms(Bottleneck(64, 64, groups=2)).eval()
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        out = block(x, torch.zeros(1, 2, 8, 8))
        bn = block.bn3
        shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(out, (x + shift.view(1, -1, 1, 1)).relu())


def test_nearest_index_matches_torch_nearest_where_exact():
    # Integer-arithmetic nearest indices equal torch's for the sizes used in practice.
    for out_size, in_size in [(56, 14), (28, 7), (14, 2), (200, 50), (304, 76), (25, 13)]:
        x = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, in_size)
        expected = F.interpolate(x, size=(1, out_size), mode='nearest').view(-1).long()
        assert torch.equal(nearest_source_index(out_size, in_size, torch.device('cpu')), expected)


def test_nearest_upsample_broadcast_and_gather_paths_agree():
    x = torch.randn(2, 3, 7, 5)
    for size in [(14, 10), (13, 9), (28, 20)]:
        rows = torch.arange(size[0]) * 7 // size[0]
        cols = torch.arange(size[1]) * 5 // size[1]
        torch.testing.assert_close(nearest_upsample(x, size), x[:, :, rows][:, :, :, cols])


@pytest.mark.parametrize('size', [(15, 15), (16, 21), (1, 1)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_depthwise_avg_pool_equals_avg_pool(size, memory_format):
    from sar_backbones.models.layers import DepthwiseAvgPool2d
    x = torch.randn(2, 8, *size, requires_grad=True)
    pool = DepthwiseAvgPool2d(3, stride=2, padding=1)
    reference = torch.nn.AvgPool2d(3, stride=2, padding=1)
    out = pool(x.contiguous(memory_format=memory_format))
    expected = reference(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.is_contiguous(memory_format=memory_format)
    grad, = torch.autograd.grad(out.sum(), x)
    expected_grad, = torch.autograd.grad(expected.sum(), x)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    assert pool.state_dict() == {} and isinstance(pool, torch.nn.AvgPool2d)


def test_conv_spec_groups_overrides_the_block_groups():
    from sar_backbones.models.layers.blocks import ConvSpec

    class WideGroups(Bottleneck):
        def conv_specs(self, in_channels, out_channels, stride):
            mid = out_channels // 4
            return [ConvSpec(in_channels, mid, 1), ConvSpec(mid, mid, 3, stride, groups=8),
                    ConvSpec(mid, out_channels, 1)]

    block = WideGroups(64, 64, groups=2)
    assert [block.conv1.groups, block.conv2.groups, block.conv3.groups] == [2, 8, 2]

    class Crossing(WideGroups):
        def conv_specs(self, in_channels, out_channels, stride):
            specs = super().conv_specs(in_channels, out_channels, stride)
            return [specs[0], specs[1]._replace(groups=3), specs[2]]

    with pytest.raises(ValueError, match='not a multiple of the block.s groups G=2'):
        Crossing(48, 48, groups=2)


def test_drop_path_drops_the_residual_branch_per_sample_in_training_only():
    torch.manual_seed(0)
    block = randomize_norms(Bottleneck(32, 32, drop_path_rate=0.5))
    x = torch.randn(256, 32, 3, 3)
    block.eval()
    reference = Bottleneck(32, 32)
    reference.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference.eval()(x))
        block.train()
        out = block(x)
    dropped = torch.isclose(out, x.relu()).flatten(1).all(1)
    assert 0.3 < float(dropped.float().mean()) < 0.7
    with pytest.raises(ValueError, match=r'drop_path_rate must be a number in \[0, 1\)'):
        Bottleneck(32, 32, drop_path_rate=-0.1)


def test_region_selector_builds_groupnorm_with_one_group_per_mask_group():
    from sar_backbones.models.layers import RegionSelector
    selector = RegionSelector(64, groups=2, norm_cfg=dict(type='GN', num_groups=32))
    assert isinstance(selector.norm, torch.nn.GroupNorm)
    assert (selector.norm.num_groups, selector.norm.num_channels) == (2, 8)
    # Each mask group's hidden features are normalised on their own: changing
    # group 1's input does not move group 0's logits.
    x = torch.randn(1, 64, 8, 8)
    y = x.clone()
    y[:, 32:] = y[:, 32:] * 5 + 3
    with torch.no_grad():
        a = selector.eval().logits(x, (2, 2))
        b = selector.logits(y, (2, 2))
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1], b[:, 1])
