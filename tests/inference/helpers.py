"""Small deployed and undeployed SAR-ResNets for the inference-engine tests."""
import copy

import torch

from sar_backbones.inference.deploy import deploy_backbone
from tests.robustness.helpers import NARROW, eval_model, relative_error  # noqa: F401

# Output stride 8 (segmentation): stages 3 and 4 dilated instead of strided.
OS8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
# A narrow SAR-ResNet50 (Bottleneck; stage widths 64/128/256/512).
NARROW_50 = dict(depth=50, stem_channels=16, base_channels=16)


def force_selection(model, keep: bool):
    """Make every learned mask select every patch (``keep``) or none."""
    with torch.no_grad():
        for stage in model.sar_stages:
            for selector in stage.selectors:
                selector.fc.weight.zero_()
                selector.fc.bias.view(-1, 2).copy_(
                    torch.tensor([0.0, 10.0] if keep else [10.0, 0.0]))
    return model


def deployed_copy(model):
    """A deployed deep copy of an eval model (the original stays undeployed)."""
    deployed = copy.deepcopy(model)
    deploy_backbone(deployed)
    return deployed


def forward(model, x, mode='sparse'):
    """Outputs (cloned) and masks of one forward without gradients in ``mode``."""
    model.set_inference_mode(mode)
    with torch.no_grad():
        outs = [o.clone() for o in model(x)]
    masks = [m.clone() for m in model.get_masks()]
    model.set_inference_mode('sparse')
    return outs, masks


def assert_close(actual, expected, tolerance=1e-4):
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, (index, a.shape, e.shape)
        error = relative_error(a, e)
        assert error < tolerance, (index, error)
