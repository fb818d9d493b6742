"""FLOPs and parameters reproduce the authors' figures and the paper's claims."""
import pytest
import torch
import torchvision

from sar_backbones.analysis import count_macs, model_complexity
from sar_backbones.models import SARResNet

RESNET50_GMACS = 4.09  # ResNet-50, same convention (README.md, "Complexity")


def _gmacs(model, rate):
    return model_complexity(model, activation_rate=rate, num_classes=1000)['flops'] / 1e9


def test_resnet50_reference_count():
    macs = count_macs(torchvision.models.resnet50().eval(), (3, 224, 224))[0]
    assert macs / 1e9 == pytest.approx(RESNET50_GMACS, rel=0.005)


def test_g2s2a2b1_is_linear_in_rate_with_reference_coefficients():
    model = SARResNet(depth=50, groups=2, base_stride=2, alpha=2, beta=1)
    static, full = _gmacs(model, 0.0), _gmacs(model, 1.0)
    assert static == pytest.approx(1.857, rel=0.01)
    assert full - static == pytest.approx(1.047, rel=0.01)
    assert _gmacs(model, 0.37) == pytest.approx(static + 0.37 * (full - static), rel=1e-9)
    params = model_complexity(model, num_classes=1000)['params']
    assert params / 1e6 == pytest.approx(25.02, abs=0.01)


def test_paper_claims():
    resnet50_params = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    g4 = model_complexity(SARResNet(depth=50, groups=4), num_classes=1000)
    assert 1 - g4['params'] / resnet50_params == pytest.approx(0.083, abs=0.01)
    assert 1 - _gmacs(SARResNet(depth=50, groups=2), 0.5) / RESNET50_GMACS == \
        pytest.approx(0.41, abs=0.01)
    assert 1 - _gmacs(SARResNet(depth=50, groups=1), 0.3) / RESNET50_GMACS == \
        pytest.approx(0.397, abs=0.01)


def test_measured_rates_from_a_forward():
    model = SARResNet(depth=18, groups=2).eval()
    model.set_mask_override(0.5)
    with torch.no_grad():
        model(torch.randn(3, 3, 224, 224))
    rates = model.get_activation_rates()
    measured = model_complexity(model, activation_rate=rates)
    assert len(measured['flops_per_image']) == 3
    per_block = model_complexity(model, activation_rate=rates.mean(0))
    assert measured['flops'] == pytest.approx(per_block['flops'])
    assert measured['flops_static'] < measured['flops'] < measured['flops_dense']
    with pytest.raises(ValueError, match='per-block rates'):
        model_complexity(model, activation_rate=[0.5, 0.5])


def test_counting_is_invisible_to_backbone_hooks_and_keeps_the_last_masks():
    """The rate logger and tools/demo.py average rates with a forward hook on the
    backbone; the all-selected counting pass must not show up there (it once
    pushed the demo's reported rates from ~0.5 towards 1)."""
    torch.manual_seed(0)
    backbone = SARResNet(depth=18, groups=2, patch_grid=(4, 2, 2)).eval()
    backbone.set_mask_override(0.25)
    seen = []
    backbone.register_forward_hook(lambda module, args, out: seen.append(
        module.get_activation_rates().mean().item()))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 64))
    masks = backbone.get_masks()
    cost = model_complexity(backbone, input_shape=(3, 96, 80))
    assert cost['flops'] == cost['flops_dense'] > cost['flops_static']
    assert seen == [pytest.approx(0.25)]
    assert all(a is b for a, b in zip(backbone.get_masks(), masks))
