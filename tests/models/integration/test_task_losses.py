"""One training step of each SAR task model, built from the shipped configs."""
import pytest
import torch
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from sar_backbones.models.layers import RegionSelector
from sar_backbones.registry import MODELS
from .sar_task_configs import (CLASSIFIER, DEEPLABV3, FASTER_RCNN, PSPNET, RETINANET,
                               tiny_cls_config, tiny_det_config, tiny_seg_config)

CASES = {
    'faster_rcnn': (FASTER_RCNN, tiny_det_config, 'FasterRCNN'),
    'retinanet': (RETINANET, tiny_det_config, 'RetinaNet'),
    'deeplabv3': (DEEPLABV3, tiny_seg_config, 'EncoderDecoder'),
    'pspnet': (PSPNET, tiny_seg_config, 'EncoderDecoder'),
    'classifier': (CLASSIFIER, tiny_cls_config, 'ImageClassifier'),
}


def _selector_params(model):
    return [(name, param) for module_name, module in model.backbone.named_modules()
            if isinstance(module, RegionSelector)
            for name, param in module.named_parameters(prefix=module_name)
            if param.requires_grad]


@pytest.mark.parametrize('case', sorted(CASES))
def test_one_training_step(case, tiny_data, tmp_path):
    path, make_cfg, parent = CASES[case]
    cfg = make_cfg(path, tiny_data, tmp_path)
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    # Thin subclass: the task's own class builds the same checkpoint keys.
    assert type(model).__mro__[2].__name__ == parent
    plain = MODELS.build(dict(cfg.model, type=f'{cfg.default_scope}.{parent}'))
    assert type(plain).__name__ == parent
    assert list(model.state_dict()) == list(plain.state_dict())
    loader = Runner.build_dataloader(cfg.train_dataloader)
    model.train()
    data = model.data_preprocessor(next(iter(loader)), True)
    losses = model(**data, mode='loss')

    assert 'loss_act_rate' in losses
    rate_loss = losses['loss_act_rate']
    assert rate_loss.dim() == 0 and rate_loss.requires_grad
    # lambda * mean over blocks of (batch rate - t)^2 with the config's t and lambda.
    backbone = model.backbone
    rates = backbone.get_activation_rates()
    expected = backbone.rate_loss_weight * (
        (rates.mean(0) - backbone.target_rate)**2).mean()
    torch.testing.assert_close(rate_loss.detach(), expected)
    # At initialisation every region is selected, so the loss is not zero.
    assert rate_loss.item() > 0

    # The rate loss reaches every trainable mask generator parameter.
    params = _selector_params(model)
    assert params, 'no trainable region selector'
    grads = torch.autograd.grad(rate_loss, [p for _, p in params], retain_graph=True)
    for (name, _), grad in zip(params, grads):
        assert torch.isfinite(grad).all(), name
    fc_grads = [g for (name, _), g in zip(params, grads) if name.endswith('fc.bias')]
    assert fc_grads and all(g.abs().sum() > 0 for g in fc_grads)

    # mmengine optimises every key containing 'loss' and only logs the rates.
    total, log_vars = model.parse_losses(losses)
    task_total = sum(v.mean() if isinstance(v, torch.Tensor) else sum(x.mean() for x in v)
                     for k, v in losses.items() if 'loss' in k and k != 'loss_act_rate')
    torch.testing.assert_close(total, task_total + rate_loss)
    for key in ('act_rate', 'act_rate_stage1', 'act_rate_stage2', 'act_rate_stage3'):
        value = float(log_vars[key])
        assert 0. <= value <= 1., (key, value)
        assert not losses[key].requires_grad
    total.backward()
