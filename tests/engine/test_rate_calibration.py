"""Inference-rate hooks in a real mmengine Runner (issue 16).

``SARRateLoggerHook`` reports per-block inference rates and, after training
iterations, the training rates next to them; ``SARRateCalibrationHook`` sets
every block's eval-mode rate on the last training batches to t before the
last checkpoint is saved.
"""
import pytest
import torch
from mmengine.hooks import Hook

from sar_backbones.engine import SARRateLoggerHook, get_sar_backbone
from sar_backbones.engine.hooks import SARRateCalibrationHook
from sar_backbones.models.layers import RegionSelector
from .test_sar_hooks import TARGET, RecordHook, ToyData, make_runner


class TrainRates(Hook):
    """Per-block batch-mean training rates of every iteration, as the backbone recorded them."""
    priority = 'LOW'

    def __init__(self):
        self.rows = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        backbone = get_sar_backbone(runner.model)
        self.rows.append(backbone.get_activation_rates().detach().mean(0))


def _input_dependent_selectors(backbone):
    # As after training: decisions that vary over images and patches.
    torch.manual_seed(0)
    for module in backbone.modules():
        if isinstance(module, RegionSelector):
            module.fc.bias.data.view(-1, 2)[:, 0] = 10.
            module.fc.weight.data.normal_(std=20.)


def test_logger_reports_block_rates_and_training_rates_at_validation(tmp_path):
    train_rates = TrainRates()
    runner = make_runner(tmp_path, RecordHook(), val=True, extra_hooks=[train_rates])
    runner.register_hook(SARRateLoggerHook(compute_flops=False))
    backbone = get_sar_backbone(runner.model)
    _input_dependent_selectors(backbone)
    seen = []
    handle = backbone.register_forward_hook(
        lambda m, args, out: None if m.training else seen.append(m.get_activation_rates().clone()))
    runner.train()  # mmengine validates after the last epoch whatever val_interval says
    handle.remove()
    hub = runner.message_hub
    metrics = {key[4:]: hub.get_scalar(key).current() for key in hub.log_scalars
               if key.startswith('val/')}

    # Inference (validation) rates per block and per stage.
    rates = torch.cat(seen)
    assert rates.shape[0] == len(ToyData())
    for block, rate in enumerate(rates.mean(0).tolist(), start=1):
        assert metrics[f'act_rate_block{block}'] == pytest.approx(rate, rel=1e-6)
    # Training rates of all 12 iterations before that validation, next to them.
    train = torch.stack(train_rates.rows).double().mean(0)
    assert len(train_rates.rows) == 12
    for block, rate in enumerate(train.tolist(), start=1):
        assert metrics[f'train_act_rate_block{block}'] == pytest.approx(rate, rel=1e-6)
    for stage, cols in enumerate(backbone.stage_block_slices(), start=1):
        assert metrics[f'train_act_rate_stage{stage}'] == pytest.approx(
            float(train[cols].mean()), rel=1e-6)
        assert 0 <= metrics[f'train_act_rate_det_stage{stage}'] <= 1
    # Reported once: a second validation without training has no training rates.
    assert not any(key.startswith('train_') for key in runner.val())


def test_calibration_hook_sets_eval_rates_of_the_last_batches_to_target(tmp_path):
    # by_epoch: 4 epochs of 3 batches of 2; the last 3 batches are the last epoch.
    runner = make_runner(tmp_path, RecordHook(), by_epoch=True,
                         extra_hooks=[dict(type='sar_backbones.SARRateCalibrationHook',
                                           num_batches=3)])
    backbone = get_sar_backbone(runner.model)
    _input_dependent_selectors(backbone)
    runner.train()
    backbone.eval()
    with torch.no_grad():
        backbone(ToyData().images)  # the last epoch's six images (no shuffling)
    rates = backbone.get_activation_rates().mean(0)
    for block, mask in enumerate(backbone.get_masks()):
        patches = mask[:, 0].numel()  # images x patches of one group
        # t up to the rounding of t x patches to whole patches.
        assert abs(float(rates[block]) - TARGET) <= 0.5 / patches + 1e-6, (block, rates)
    # The checkpoint of the last epoch carries the calibrated thresholds.
    state = torch.load(tmp_path / 'epoch_4.pth', map_location='cpu', weights_only=False)
    key = 'backbone.layer1.selectors.0.fc.bias'
    assert torch.equal(state['state_dict'][key],
                       backbone.state_dict()['layer1.selectors.0.fc.bias'])


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_batches=0), 'num_batches'),
    (dict(num_batches=2.5), 'num_batches'),
    (dict(num_batches=True), 'num_batches'),
    (dict(target=0.), 'target'),
    (dict(target=1.5), 'target'),
    (dict(target='0.5'), 'target'),
    (dict(pipeline=dict(type='LoadImageFromFile')), 'pipeline'),
    (dict(pipeline=['LoadImageFromFile']), 'pipeline'),
    (dict(batch_size=0), 'batch_size'),
])
def test_calibration_hook_arguments_are_checked(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        SARRateCalibrationHook(**kwargs)


def test_calibration_with_a_pipeline_needs_the_training_set_as_config(tmp_path):
    # The toy runner's training set is a Dataset object: it cannot be reloaded
    # through another pipeline, which must be said, not silently skipped.
    runner = make_runner(tmp_path, RecordHook(), extra_hooks=[dict(
        type='sar_backbones.SARRateCalibrationHook', num_batches=1,
        pipeline=[dict(type='PackInputs')])])
    with pytest.raises(TypeError, match='train_dataloader.dataset must be a config dict'):
        runner.train()
