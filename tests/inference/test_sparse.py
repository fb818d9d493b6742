"""The sparse (gather-conv-scatter) refine branch equals the dense masked one."""
import pytest
import torch

from sar_backbones.inference.sparse import add_relu_, patch_layout
from sar_backbones.models.backbones import SARStage
from sar_backbones.models.layers import BasicBlock, Bottleneck
from tests.models.helpers import randomize_norms, relative_error


def _stage(block, in_ch, out_ch, groups, **kwargs):
    torch.manual_seed(0)
    stage = SARStage(block, in_ch, out_ch, num_blocks=3, groups=groups, base_stride=2, alpha=2,
                     beta=1, **kwargs)
    return randomize_norms(stage).eval()


def _run_both(stage, x, masks):
    """Stage output in the dense and the sparse path with the given patch masks."""
    def override(mask, index):
        return masks[index].to(mask)

    with torch.no_grad():
        dense, _ = stage(x, tau=1.0, sparse=False, mask_override=override)
        sparse, _ = stage(x, tau=1.0, sparse=True, mask_override=override)
    return dense, sparse


def _masks(kind, batch, groups, grid, num=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, groups) + grid
    if kind == 'random':
        rate = 0.3 + 0.4 * torch.rand(num, generator=generator)  # 30-70 % selection
        return [(torch.rand(shape, generator=generator) < r).float() for r in rate]
    if kind == 'all':
        return [torch.ones(shape)] * num
    if kind == 'none':
        return [torch.zeros(shape)] * num
    if kind == 'adjacent':  # a solid block of neighbouring patches plus a checkerboard
        mask = torch.zeros(shape)
        mask[..., 1:3, 1:4] = 1
        checker = (torch.arange(grid[0])[:, None] + torch.arange(grid[1])) % 2
        return [mask, checker.float().expand(shape).clone()]
    raise ValueError(kind)


@pytest.mark.parametrize('block,in_ch,out_ch', [(Bottleneck, 64, 256), (BasicBlock, 64, 64)])
@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('kind', ['random', 'all', 'none', 'adjacent'])
def test_sparse_equals_dense_divisible(block, in_ch, out_ch, groups, kind):
    stage = _stage(block, in_ch, out_ch, groups, patch_grid=7)
    x = torch.randn(2, in_ch, 28, 28)
    dense, sparse = _run_both(stage, x, _masks(kind, 2, groups, (7, 7)))
    assert relative_error(sparse, dense) < 1e-4


@pytest.mark.parametrize('size,grid_kwargs', [
    ((200, 304), dict(patch_size=4)),    # stage 1 of an 800x1216 image, 50x76 patches
    ((200, 304), dict(patch_grid=14)),   # 14 does not divide 200 or 304: uneven patches
    ((25, 39), dict(patch_size=7)),      # odd sizes, partial last patches
    ((13, 9), dict(patch_grid=4)),
])
@pytest.mark.parametrize('groups', [1, 2])
def test_sparse_equals_dense_uneven_sizes(size, grid_kwargs, groups):
    stage = _stage(Bottleneck, 64, 128, groups, **grid_kwargs)
    x = torch.randn(1, 64, *size)
    grid = stage.patch_grid_for(*size)
    dense, sparse = _run_both(stage, x, _masks('random', 1, groups, grid, seed=1))
    assert relative_error(sparse, dense) < 1e-4


@pytest.mark.parametrize('dilation', [2, 4])
def test_sparse_equals_dense_dilated(dilation):
    stage = _stage(Bottleneck, 64, 128, 2, patch_grid=4, dilation=dilation)
    x = torch.randn(2, 64, 30, 30)
    dense, sparse = _run_both(stage, x, _masks('random', 2, 2, (4, 4), seed=2))
    assert relative_error(sparse, dense) < 1e-4


def test_layout_covers_every_pixel_once():
    for height, width, grid in [(200, 304, (14, 14)), (25, 39, (4, 6)), (56, 56, (14, 14))]:
        layout = patch_layout(height, width, grid, 1, torch.device('cpu'))
        own = layout.core[layout.core >= 0]
        assert torch.equal(own.sort().values, torch.arange(height * width))
        # Each pixel's patch is the nearest-neighbour source cell of the mask.
        patch_of_pixel = torch.empty(height * width, dtype=torch.long)
        for patch, pixels in enumerate(layout.core):
            patch_of_pixel[pixels[pixels >= 0]] = patch
        rows = torch.arange(height) * grid[0] // height
        cols = torch.arange(width) * grid[1] // width
        assert torch.equal(patch_of_pixel, (rows[:, None] * grid[1] + cols).flatten())


@pytest.mark.parametrize('height,width,grid,dilation', [
    (28, 28, (7, 7), 1), (25, 39, (4, 6), 1), (13, 9, (4, 4), 2), (30, 30, (4, 4), 4)])
def test_layout_windows_point_at_the_owners_core(height, width, grid, dilation):
    layout = patch_layout(height, width, grid, dilation, torch.device('cpu'))
    win_h, win_w = layout.window_shape
    assert (win_h, win_w) == (layout.patch_shape[0] + 2 * dilation,
                              layout.patch_shape[1] + 2 * dilation)
    for patch, pixels in enumerate(layout.core):
        first = int(pixels[0])  # the top-left pixel of a patch is never padding
        top, left = divmod(first, width)
        for slot, pixel in enumerate(layout.window[patch].tolist()):
            y, x = top - dilation + slot // win_w, left - dilation + slot % win_w
            inside = 0 <= y < height and 0 <= x < width
            assert pixel == (y * width + x if inside else -1)
            if inside:  # the gather finds the pixel in its owner's core
                owner, local = layout.window_patch[patch, slot], layout.window_local[patch, slot]
                assert int(layout.core[owner, local]) == pixel


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])  # fused kernel / fallback
def test_add_relu_in_place(dtype):
    x = torch.randn(50, 16).to(dtype)
    bias = torch.randn(16).to(dtype)
    expected, untouched = torch.relu(x[:40] + bias), x[40:].clone()
    rows = x[:40]  # a view, as the sparse path passes the pixel rows of its buffer
    assert add_relu_(rows, bias) is rows
    assert torch.equal(x[:40], expected) and torch.equal(x[40:], untouched)
