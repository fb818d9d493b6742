"""Small SAR-ResNets for the robustness tests."""
import torch

from sar_backbones.models import SARResNet
from tests.models.helpers import randomize_norms, relative_error  # noqa: F401

# A narrow SAR-ResNet18 (stage widths 16/32/64/128) keeps every test fast.
NARROW = dict(depth=18, stem_channels=16, base_channels=16)


def partial_selectors(model, seed=0, std=2.0):
    """Feature-driven, balanced {skip, keep} logits: learned masks select part of the patches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in model.sar_stages:
            for selector in stage.selectors:
                weight = torch.randn(selector.fc.weight.shape, generator=generator) * std
                selector.fc.weight.copy_(weight)
                selector.fc.bias.zero_()
    return model


def eval_model(seed=0, **kwargs):
    """A narrow SAR-ResNet18 in eval mode with random BN statistics and partial masks."""
    torch.manual_seed(seed)
    model = SARResNet(**{**NARROW, **kwargs})
    randomize_norms(model, seed=seed)
    return partial_selectors(model, seed=seed).eval()


def run_paths(model, x, context=torch.no_grad):
    """Outputs and masks of the dense and the sparse path on ``x``."""
    results = {}
    for mode in ('dense', 'sparse'):
        model.set_inference_mode(mode)
        with context():
            outs = model(x)
        results[mode] = ([o.clone() for o in outs], [m.clone() for m in model.get_masks()])
    model.set_inference_mode('sparse')
    return results['dense'], results['sparse']
