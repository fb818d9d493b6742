"""Bad inputs, bad configs and mismatching checkpoints fail early, naming the problem."""
import re
from pathlib import Path

import pytest
import torch

from sar_backbones.models import SARResNet
from sar_backbones.models.integration import BackboneCheckpointMismatchError
from tests.robustness.helpers import NARROW
from tests.script_loading import load_script

REPO = Path(__file__).resolve().parents[2]


def narrow(**kwargs):
    return SARResNet(**{**NARROW, **kwargs})


# ---------------------------------------------------------------------- inputs
@pytest.fixture(scope='module')
def model():
    return narrow().eval()


@pytest.mark.parametrize('x,shown', [
    (torch.rand(3, 64, 64), r'\(3, 64, 64\)'),
    (torch.rand(1, 1, 3, 64, 64), r'\(1, 1, 3, 64, 64\)'),
    ([torch.rand(3, 64, 64)], 'list'),
], ids=['3d', '5d', 'list'])
def test_input_must_be_4d(model, x, shown):
    with pytest.raises(ValueError, match=r'expects a 4-D \(N, C, H, W\) tensor, got ' + shown):
        model(x)


def test_input_channels_must_match_in_channels(model):
    with pytest.raises(ValueError, match=r'expects 3 input channels \(in_channels=3\), got 1 '
                                         r'in an input of shape \(2, 1, 64, 64\)'):
        model(torch.rand(2, 1, 64, 64))
    gray = narrow(in_channels=1).eval()
    with torch.no_grad():
        gray(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r'expects 1 input channels \(in_channels=1\), got 3'):
        gray(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int64, torch.float64])
def test_input_dtype_must_match_the_weights(model, dtype):
    x = (torch.rand(1, 3, 64, 64) * 255).to(dtype)
    with pytest.raises(TypeError, match=rf'floating-point input of the dtype of its stem weights '
                                        rf'\(torch.float32\) or autocast, got {dtype}'):
        model(x)


@pytest.mark.parametrize('kwargs,size,stage,fmap,grid,need', [
    # Default K = 14/7/2: stage 1 needs a 14x14 stride-4 map.
    (dict(), (32, 32), 1, '8x8', 14, 53),
    (dict(), (52, 200), 1, '13x50', 14, 53),
    # The largest grid relative to its stride decides the minimum: stage 3 here.
    (dict(patch_grid=(4, 4, 8)), (112, 120), 3, '7x8', 8, 113),
    # OS8 (strides 1, 2, 1, 1): stage 3 works at stride 8.
    (dict(patch_grid=(4, 2, 6), strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), deep_stem=True),
     (40, 40), 3, '5x5', 6, 41),
])
def test_image_too_small_for_the_patch_grid(kwargs, size, stage, fmap, grid, need):
    small = narrow(**kwargs).eval()
    with pytest.raises(ValueError) as info:
        small(torch.rand(1, 3, *size))
    message = str(info.value)
    assert f'input {size[0]}x{size[1]} is too small for SAR stage {stage}' in message
    assert f'its {fmap} feature map' in message and f'a {grid}x{grid} patch grid' in message
    assert f'patch_grid={small.patch_grid}' in message
    assert f'feed at least {need}x{need} pixels or use patch_size=' in message
    # The minimum it names is exact: that size works, one pixel less does not.
    with torch.no_grad():
        small(torch.rand(1, 3, need, need))
    for shape in ((need - 1, need), (need, need - 1)):
        with pytest.raises(ValueError, match='too small'):
            small(torch.rand(1, 3, *shape))


def test_patch_size_mode_accepts_tiny_images():
    tiny = narrow(patch_grid=None, patch_size=(4, 4, 7)).eval()
    with torch.no_grad():
        outs = tiny(torch.rand(1, 3, 5, 3))
    assert [tuple(o.shape[-2:]) for o in outs] == [(2, 1), (1, 1), (1, 1), (1, 1)]


def test_stage_level_grid_check_names_the_grid():
    stage = narrow(patch_grid=(8, 4, 2)).layer1
    with pytest.raises(ValueError, match=r'input too small: a 5x9 feature map cannot be split '
                                         r'into the 8x8 patch grid \(patch_grid=8\)'):
        stage.patch_grid_for(5, 9)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize('kwargs,error,pattern', [
    (dict(depth=20), KeyError, r'invalid depth 20 for SARResNet; choose from \[18, 34, 50, 101\]'),
    (dict(depth='50'), KeyError, r"invalid depth 50 for SARResNet; choose from"),
    # groups must divide every channel count of a stage, and the message says which.
    (dict(groups=3), ValueError,
     r'groups \(G=3\) must divide every channel count of SAR stage 1, but its input width is 16'),
    (dict(groups=0), ValueError, r'groups \(G\) must be a positive int, got 0'),
    (dict(alpha=16), ValueError,
     r'groups \(G=2\) must divide every channel count of SAR stage 1, but its base width '
     r'C/alpha is 1\.0 \(C=16, alpha=16, beta=1\)'),
    (dict(groups=8, beta=0.75), ValueError,
     r'groups \(G=8\) .* SAR stage 1, but its refine width beta\*C is 12\.0 '
     r'\(C=16, alpha=2, beta=0\.75\)'),
    (dict(depth=50, stem_channels=128, base_channels=64, alpha=1, beta=0.25, groups=32),
     ValueError, r'groups \(G=32\) .* SAR stage 1, but its refine bottleneck width '
     r'beta\*C/4 is 16\.0 \(C=256, alpha=1, beta=0\.25\)'),
    # alpha, beta, base_stride.
    (dict(alpha=0), ValueError, r'alpha must be a positive int \(base width C/alpha\), got 0'),
    (dict(alpha=1.5), ValueError, r'alpha must be a positive int \(base width C/alpha\), got 1\.5'),
    (dict(beta=0), ValueError, r'beta must be > 0 \(refine width beta\*C\), got 0'),
    (dict(beta=-1), ValueError, r'beta must be > 0 \(refine width beta\*C\), got -1'),
    (dict(base_stride=3), ValueError, r'base_stride \(s\) must be 2 or 4, got \(3, 3, 2\)'),
    (dict(base_stride=(2, 4, 8)), ValueError, r'base_stride \(s\) must be 2 or 4, got \(2, 4, 8\)'),
    (dict(base_stride=(2, 2)), ValueError,
     r'base_stride needs one value per SAR stage \(3\), got \(2, 2\)'),
    (dict(patch_grid=(14, 7)), ValueError, r'patch_grid needs one value per SAR stage \(3\)'),
    (dict(patch_grid=0), ValueError, r'patch_grid must hold positive ints, got \(0, 0, 0\)'),
    (dict(patch_grid=(4, 4, 2), patch_size=4), ValueError,
     r'give either patch_grid .* or patch_size, not both'),
    (dict(patch_grid=None), ValueError, r'one of patch_grid or patch_size must be set'),
    # Target rate t in (0, 1].
    (dict(target_rate=0), ValueError, r'target_rate must be in \(0, 1\], got 0'),
    (dict(target_rate=1.01), ValueError, r'target_rate must be in \(0, 1\], got 1\.01'),
    (dict(target_rate=-0.5), ValueError, r'target_rate must be in \(0, 1\], got -0\.5'),
    (dict(target_rate=float('nan')), ValueError, r'target_rate must be in \(0, 1\], got nan'),
    # Loss weight, temperature, loss form, inference mode.
    (dict(rate_loss_weight=-1), ValueError,
     r'rate_loss_weight \(lambda\) must be a finite number >= 0, got -1'),
    (dict(rate_loss_weight=float('nan')), ValueError, r'rate_loss_weight .* got nan'),
    (dict(rate_loss_weight=float('inf')), ValueError, r'rate_loss_weight .* got inf'),
    (dict(temperature=0), ValueError, r'temperature must be a finite number > 0, got 0'),
    (dict(temperature=float('inf')), ValueError,
     r'temperature must be a finite number > 0, got inf'),
    (dict(rate_loss='mean'), ValueError,
     r"rate_loss must be 'batch' \(Eq\. 10\) or 'sample' \(Eq\. 11\), got 'mean'"),
    (dict(inference_mode='fast'), ValueError,
     r"inference_mode must be 'sparse' or 'dense', got 'fast'"),
    (dict(norm_cfg=dict(type='GN', num_groups=4)), ValueError,
     r"norm_cfg type 'GN' needs inference_mode='dense'"),
    (dict(frozen_stages=5), ValueError, r'frozen_stages must be -1 \(none\), 0 \(stem\) or 1\.\.4'),
    (dict(frozen_stages=-2), ValueError, r'frozen_stages must be .* got -2'),
    # Per-stage sequences of the wrong length.
    (dict(out_indices=(0, 1, 2, 3, 4)), ValueError,
     r'out_indices must be distinct stage indices in 0\.\.3, got \(0, 1, 2, 3, 4\)'),
    (dict(out_indices=()), ValueError, r'out_indices must be distinct stage indices in 0\.\.3'),
    (dict(out_indices=(3, 3)), ValueError, r'out_indices must be distinct .* got \(3, 3\)'),
    (dict(strides=(1, 2, 2)), ValueError,
     r'strides and dilations need 4 values \(one per stage\), got strides=\(1, 2, 2\)'),
    (dict(dilations=(1, 1, 2, 4, 4)), ValueError,
     r'strides and dilations need 4 values .* dilations=\(1, 1, 2, 4, 4\)'),
    # Inconsistent output-stride-8 settings.
    (dict(strides=(1, 2, 2, 1), dilations=(1, 1, 2, 4)), ValueError,
     r'stage 3 both strides and dilates \(strides=\(1, 2, 2, 1\), dilations=\(1, 1, 2, 4\)\); '
     r'for output stride 8 use strides=\(1, 2, 1, 1\) and dilations=\(1, 1, 2, 4\)'),
    (dict(strides=(1, 2, 1, 2), dilations=(1, 1, 2, 4)), ValueError,
     r'stage 4 both strides and dilates'),
    (dict(strides=(2, 2, 2, 2)), ValueError, r'strides\[0\] must be 1'),
    (dict(strides=(1, 3, 2, 2)), ValueError,
     r'stage 2: stride must be 1 or 2 and dilation >= 1, got strides=\(1, 3, 2, 2\)'),
    (dict(dilations=(1, 1, 0, 1)), ValueError, r'stage 3: stride must be 1 or 2 and dilation >= 1'),
])
def test_bad_config_is_rejected_with_the_option_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        narrow(**kwargs)


def test_setters_validate_like_the_constructor():
    backbone = narrow()
    for bad in (0, 1.5, float('nan')):
        with pytest.raises(ValueError, match=r'target_rate must be in \(0, 1\]'):
            backbone.set_target_rate(bad)
    with pytest.raises(ValueError, match='temperature must be > 0'):
        backbone.set_temperature(0)
    with pytest.raises(ValueError, match="inference_mode must be 'sparse' or 'dense'"):
        backbone.set_inference_mode('fast')
    with pytest.raises(ValueError, match=r'mask override rate must be in \[0, 1\]'):
        backbone.set_mask_override(1.5)
    assert backbone.target_rate == 0.5 and backbone.temperature == 1.0


def test_pretrained_and_init_cfg_are_exclusive():
    with pytest.raises(ValueError, match='init_cfg and pretrained cannot be set at the same time'):
        narrow(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='a.pth'))


# ----------------------------------------------------------------- checkpoints
def _save(tmp_path, name, backbone, prefix=''):
    path = tmp_path / name
    torch.save({'state_dict': {prefix + k: v for k, v in backbone.state_dict().items()},
                'meta': {}}, path)
    return path


def _model_order_difference(model, state):
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    return missing, unexpected, shapes


def test_pretrained_with_another_depth_lists_missing_keys(tmp_path):
    path = _save(tmp_path, 'r18_cls.pth', narrow(), prefix='backbone.')
    deeper = narrow(depth=34, init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            prefix='backbone.'))
    missing, unexpected, shapes = _model_order_difference(deeper, narrow().state_dict())
    assert missing and not unexpected and not shapes
    with pytest.raises(ValueError) as info:
        deeper.init_weights()
    message = str(info.value)
    assert f'The weights from {path} do not fit the backbone SARResNet(depth=34' in message
    assert f'{len(missing)} missing in checkpoint: {missing[0]}' in message
    assert f'and {len(missing) - 8} more' in message  # long lists are cut


def test_pretrained_with_other_groups_lists_shapes(tmp_path):
    path = _save(tmp_path, 'g2.pth', narrow(groups=2))
    g4 = narrow(groups=4, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    before = {k: v.clone() for k, v in g4.state_dict().items()}
    missing, unexpected, shapes = _model_order_difference(g4, torch.load(path)['state_dict'])
    assert shapes and not missing and not unexpected
    with pytest.raises(ValueError) as info:
        g4.init_weights()
    message = str(info.value)
    key, ckpt_shape, model_shape = shapes[0]
    assert f'{len(shapes)} shape mismatch: {key}: checkpoint {ckpt_shape} vs model {model_shape}' \
        in message
    assert 'selectors' in message
    # Strict: the failed load left every weight untouched.
    for name, value in g4.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_pretrained_with_extra_keys_and_wrong_prefix(tmp_path):
    path = _save(tmp_path, 'r34.pth', narrow(depth=34), prefix='backbone.')
    r18 = narrow(init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    with pytest.raises(ValueError, match=r'not in model: layer1\.'):
        r18.init_weights()
    wrong_prefix = narrow(init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='model.'))
    with pytest.raises(ValueError, match=r"no weights under prefix 'model\.' in checkpoint \S+ "
                                         r"\(its keys start like \['backbone\.conv1\.weight'"):
        wrong_prefix.init_weights()


def _converter():
    return load_script('tools/model_converters/sar2backbone.py')


def test_converter_check_config_names_mismatching_keys(tmp_path, capsys):
    classifier_ckpt = _save(tmp_path, 'pretrain.pth', narrow(groups=2), prefix='backbone.')
    config = tmp_path / 'downstream.py'
    config.write_text(
        "custom_imports = dict(imports=['sar_backbones'], allow_failed_imports=False)\n"
        "model = dict(backbone=dict(type='sar_backbones.SARResNet', depth=18, stem_channels=16,\n"
        "                           base_channels=16, groups=4, init_cfg=dict(\n"
        "                               type='Pretrained', checkpoint='x.pth')))\n")
    converter = _converter()
    out = tmp_path / 'backbone.pth'
    with pytest.raises(BackboneCheckpointMismatchError) as info:
        converter.main([str(classifier_ckpt), str(out), '--check-config', str(config)])
    message = str(info.value)
    assert f'The weights from {classifier_ckpt} do not fit the backbone SARResNet(depth=18, ' \
           in message and 'mask_groups=4' in message
    assert re.search(r'\d+ shape mismatch: layer1\.\S+: checkpoint \(\d+(, \d+)*\) vs model',
                     message)
    assert not out.exists()
    # The matching config passes and the converted weights load strictly.
    config.write_text(config.read_text().replace('groups=4', 'groups=2'))
    converter.main([str(classifier_ckpt), str(out), '--check-config', str(config)])
    assert 'all' in capsys.readouterr().out
    loaded = narrow(groups=2, init_cfg=dict(type='Pretrained', checkpoint=str(out)))
    loaded.init_weights()
