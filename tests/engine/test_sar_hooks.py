"""SAR schedules and rate reporting inside a real mmengine Runner."""
import math
import socket
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.model import BaseModel, BaseTTAModel, MMDistributedDataParallel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from sar_backbones.analysis import model_complexity
from sar_backbones.engine import (SARGumbelNoiseHook, SARNoiseSeedHook, SARRateLoggerHook,
                                  SARRateSyncHook, SARTargetRateHook, SARTemperatureHook,
                                  get_sar_backbone)
from sar_backbones.engine.hooks import undo_unfinished_run
from sar_backbones.models import SARResNet
from sar_backbones.models.layers import RegionSelector
from sar_backbones.models.layers.gumbel import MAX_TEMPERATURE, MIN_TEMPERATURE

TARGET = 0.4
MILESTONES = (0.25, 0.5, 0.75)


class ToyData(Dataset):
    """Random 32x32 images with binary labels (fixed seed)."""

    def __init__(self, size=6, side=32):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(size, 3, side, side, generator=gen)
        self.labels = torch.randint(0, 2, (size, ), generator=gen)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return dict(inputs=self.images[index], labels=self.labels[index])


class ToySARClassifier(BaseModel):
    """SAR-ResNet18 + linear head; the loss includes the rate loss."""

    def __init__(self):
        super().__init__()
        # A narrow ResNet-18 (16 base channels) keeps checkpoints small.
        self.backbone = SARResNet(depth=18, stem_channels=16, base_channels=16,
                                  patch_grid=(2, 2, 1), target_rate=TARGET, out_indices=(3, ))
        self.head = nn.Linear(128, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        logits = self.head(self.backbone(inputs)[-1].mean((2, 3)))
        if mode == 'loss':
            return dict(loss_cls=F.cross_entropy(logits, labels),
                        **self.backbone.get_aux_losses())
        if mode == 'predict':
            return [dict(pred=p, label=t) for p, t in zip(logits.argmax(1), labels)]
        return logits


class ToyAccuracy(BaseMetric):

    def process(self, data_batch, data_samples):
        self.results.extend(float(s['pred'] == s['label']) for s in data_samples)

    def compute_metrics(self, results):
        return dict(accuracy=sum(results) / len(results))


class RecordHook(Hook):
    """Records what the SAR hooks set, after they ran (lower priority)."""
    priority = 'LOW'

    def __init__(self):
        self.seen = {}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        backbone = get_sar_backbone(runner.model)
        hub = runner.message_hub
        self.seen[runner.iter] = (backbone.temperature, backbone.target_rate,
                                  hub.get_scalar('train/tau').current(),
                                  hub.get_scalar('train/target_rate').current(),
                                  backbone.noise_scale,
                                  hub.get_scalar('train/noise_scale').current())


def expected(it, max_iters):
    progress = it / max_iters
    tau = 0.01**progress
    steps = sum(progress >= m for m in MILESTONES)
    noise = 1.0 if progress <= 0.5 else 1.0 - (progress - 0.5) / 0.5
    return tau, TARGET + (1 - TARGET) * (3 - steps) / 3, noise


def make_runner(work_dir, record, by_epoch=True, resume_from=None, val=False, model=None,
                extra_hooks=()):
    loader = dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                  batch_size=2, collate_fn=dict(type='default_collate'))
    train_loader = dict(loader)
    if by_epoch:
        train_cfg = dict(by_epoch=True, max_epochs=4, val_interval=100)
        checkpoint = dict(type='CheckpointHook', interval=2)
    else:
        train_cfg = dict(by_epoch=False, max_iters=12, val_interval=100)
        # DefaultSampler would make the iteration loop pause 2 s per epoch.
        train_loader['sampler'] = dict(type='InfiniteSampler', shuffle=False)
        checkpoint = dict(type='CheckpointHook', interval=6, by_epoch=False)
    extra = {}
    if val:
        extra = dict(val_dataloader=loader, val_cfg=dict(),
                     val_evaluator=Evaluator(ToyAccuracy()))
    return Runner(
        model=ToySARClassifier() if model is None else model,
        work_dir=str(work_dir),
        experiment_name=f'sar_hooks_{uuid.uuid4().hex}',
        train_dataloader=train_loader,
        train_cfg=train_cfg,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(checkpoint=checkpoint, logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[
            dict(type='sar_backbones.SARTemperatureHook'),
            dict(type='sar_backbones.SARTargetRateHook', milestones=MILESTONES),
            dict(type='sar_backbones.SARGumbelNoiseHook', begin=0.5),
            record,
            *extra_hooks,
        ],
        load_from=resume_from,
        resume=resume_from is not None,
        randomness=dict(seed=0),
        **extra)


def test_schedule_formulas():
    tau_hook = SARTemperatureHook()
    assert tau_hook.get_temperature(0.) == pytest.approx(1.)
    assert tau_hook.get_temperature(0.5) == pytest.approx(0.1)
    assert tau_hook.get_temperature(1.) == pytest.approx(0.01)
    assert SARTemperatureHook('constant', start=0.3).get_temperature(0.7) == 0.3
    assert SARTemperatureHook(start=2., end=0.5).get_temperature(0.5) == pytest.approx(1.)

    # The paper's ImageNet steps: 1, t + 2(1-t)/3, t + (1-t)/3, t at epochs 30/45/60 of 110.
    hook = SARTargetRateHook(target=0.5)
    for epoch, value in ((0, 1.), (29, 1.), (30, 5 / 6), (44, 5 / 6), (45, 2 / 3), (59, 2 / 3),
                         (60, 0.5), (109, 0.5)):
        assert hook.get_target_rate(epoch / 110) == pytest.approx(value), epoch
    assert SARTargetRateHook(target=0.3, mode='constant').get_target_rate(0.) == 0.3

    noise_hook = SARGumbelNoiseHook(begin=0.6, end=0.2)
    for progress, value in ((0., 1.), (0.6, 1.), (0.8, 0.6), (1., 0.2)):
        assert noise_hook.get_noise_scale(progress) == pytest.approx(value), progress
    with pytest.raises(ValueError, match='begin'):
        SARGumbelNoiseHook(begin=1.0)
    with pytest.raises(ValueError, match='end'):
        SARGumbelNoiseHook(end=-0.1)

    with pytest.raises(ValueError, match='mode'):
        SARTemperatureHook(mode='linear')
    with pytest.raises(ValueError, match='milestones'):
        SARTargetRateHook(milestones=(0.5, 0.2, 0.7))
    with pytest.raises(RuntimeError, match='before_run'):
        SARTargetRateHook().get_target_rate(0.)


@pytest.mark.parametrize('by_epoch', [True, False], ids=['epoch_loop', 'iter_loop'])
def test_hooks_set_schedule_and_survive_resume(tmp_path, by_epoch):
    record = RecordHook()
    runner = make_runner(tmp_path, record, by_epoch=by_epoch)
    runner.train()
    assert runner.max_iters == 12
    assert sorted(record.seen) == list(range(12))
    for it, (tau, target, logged_tau, logged_target, noise, logged_noise) in record.seen.items():
        want_tau, want_target, want_noise = expected(it, 12)
        assert tau == pytest.approx(want_tau, rel=1e-12), it
        assert target == pytest.approx(want_target, rel=1e-12), it
        assert noise == pytest.approx(want_noise, abs=1e-12), it
        assert (logged_tau, logged_target, logged_noise) == (tau, target, noise)
    assert record.seen[11][4] < 0.2  # the fade reached the end of training
    # Configured t (read from the model) is restored after training.
    assert get_sar_backbone(runner.model).target_rate == TARGET

    # Resume mid-training (after 6 of 12 iterations) in a fresh runner and model:
    # the hooks carry no state, so every later iteration sees the same values.
    ckpt = tmp_path / ('epoch_2.pth' if by_epoch else 'iter_6.pth')
    resumed = RecordHook()
    runner2 = make_runner(tmp_path / 'resumed', resumed, by_epoch=by_epoch, resume_from=str(ckpt))
    runner2.train()
    assert sorted(resumed.seen) == list(range(6, 12))
    for it, values in resumed.seen.items():
        assert values == record.seen[it], it


def test_get_sar_backbone_unwraps_wrappers():
    model = ToySARClassifier()
    assert get_sar_backbone(model) is model.backbone

    class TTA(BaseTTAModel):

        def merge_preds(self, data_samples_list):
            return data_samples_list

    assert get_sar_backbone(TTA(module=model)) is model.backbone
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                                         rank=0, world_size=1)
    try:
        ddp = MMDistributedDataParallel(module=model)
        assert get_sar_backbone(ddp) is model.backbone
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(TypeError, match='no SAR backbone'):
        get_sar_backbone(nn.Linear(2, 2))


def test_rate_logger_reports_rate_and_effective_gflops(tmp_path):
    runner = make_runner(tmp_path, RecordHook(), val=True)
    logger_hook = SARRateLoggerHook()
    runner.register_hook(logger_hook)
    backbone = get_sar_backbone(runner.model)

    # Record what the backbone computes in eval, independently of the hook.
    seen = []
    handle = backbone.register_forward_hook(
        lambda m, args, out: seen.append(m.get_activation_rates().clone()))
    # Make the selectors input-dependent (as after training) so that some
    # regions are skipped: equal skip/keep biases, large random weights.
    torch.manual_seed(0)
    for module in backbone.modules():
        if isinstance(module, RegionSelector):
            module.fc.bias.data.view(-1, 2)[:, 0] = 10.
            module.fc.weight.data.normal_(std=20.)
    metrics = runner.val()
    handle.remove()

    # The first three calls are the val batches (then the FLOPs counter runs).
    rates = torch.cat(seen[:3])
    assert rates.shape == (6, backbone.num_masked_blocks)
    assert 0 < rates.mean() < 1, 'expected a partial selection'
    assert metrics['act_rate'] == pytest.approx(float(rates.mean()), rel=1e-6)
    for stage, cols in enumerate(backbone.stage_block_slices(), start=1):
        assert metrics[f'act_rate_stage{stage}'] == pytest.approx(float(rates[:, cols].mean()),
                                                                  rel=1e-6)
    want = model_complexity(backbone, input_shape=(3, 32, 32), activation_rate=rates)['flops']
    assert metrics['effective_gflops'] == pytest.approx(want / 1e9, rel=1e-6)
    dense = model_complexity(backbone, input_shape=(3, 32, 32))['flops']
    assert metrics['effective_gflops'] < dense / 1e9
    assert 'accuracy' in metrics
    # Logged through the message hub, i.e. in the 'Epoch(val)' line next to accuracy.
    assert runner.message_hub.get_scalar('val/act_rate').current() == metrics['act_rate']
    assert runner.message_hub.get_scalar('val/effective_gflops').current() == \
        metrics['effective_gflops']
    # The forward hook is gone after the epoch; the FLOPs count per input size
    # is kept for the next epochs.
    assert not backbone._forward_hooks
    assert list(logger_hook._cost_cache) == [(3, 32, 32)]

    # The same through runner.test(), at a fixed FLOPs input size.
    test_runner = Runner(
        model=runner.model, work_dir=str(tmp_path / 'test'),
        test_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                             batch_size=3, collate_fn=dict(type='default_collate')),
        test_cfg=dict(), test_evaluator=Evaluator(ToyAccuracy()),
        custom_hooks=[dict(type='sar_backbones.SARRateLoggerHook', flops_input_shape=(3, 64, 64))])
    test_metrics = test_runner.test()
    assert test_metrics['act_rate'] == pytest.approx(metrics['act_rate'], rel=1e-6)
    per_block = rates.mean(0)
    want = model_complexity(backbone, input_shape=(3, 64, 64), activation_rate=per_block)['flops']
    assert test_metrics['effective_gflops'] == pytest.approx(want / 1e9, rel=1e-6)
    assert test_runner.message_hub.get_scalar('test/effective_gflops').current() == \
        test_metrics['effective_gflops']
    assert math.isfinite(test_metrics['accuracy'])


NAN, INF = float('nan'), float('inf')


@pytest.mark.parametrize('build, name', [
    # Temperatures outside what SARResNet.set_temperature accepts, or not numbers.
    (lambda: SARTemperatureHook(start=0), 'start'),
    (lambda: SARTemperatureHook(start=-1.0), 'start'),
    (lambda: SARTemperatureHook(start=NAN), 'start'),
    (lambda: SARTemperatureHook(start=INF), 'start'),
    (lambda: SARTemperatureHook(start=MAX_TEMPERATURE * 10), 'start'),
    (lambda: SARTemperatureHook(end=MIN_TEMPERATURE / 10), 'end'),
    (lambda: SARTemperatureHook(end=1e-50), 'end'),
    (lambda: SARTemperatureHook(end=NAN), 'end'),
    (lambda: SARTemperatureHook(end='0.01'), 'end'),
    (lambda: SARTemperatureHook(start=None), 'start'),
    (lambda: SARTemperatureHook(start=True), 'start'),
    (lambda: SARTemperatureHook(mode=None), 'mode'),
    (lambda: SARTemperatureHook(mode='EXP'), 'mode'),
    # Target rates that SARResNet.set_target_rate refuses halfway through training.
    (lambda: SARTargetRateHook(target=0), 'target'),
    (lambda: SARTargetRateHook(target=-0.5), 'target'),
    (lambda: SARTargetRateHook(target=1.5), 'target'),
    (lambda: SARTargetRateHook(target=NAN), 'target'),
    (lambda: SARTargetRateHook(target='0.5'), 'target'),
    (lambda: SARTargetRateHook(mode='linear'), 'mode'),
    (lambda: SARTargetRateHook(milestones=(0.5, 0.2, 0.7)), 'milestones'),
    (lambda: SARTargetRateHook(milestones=(0.2, 0.5)), 'milestones'),
    (lambda: SARTargetRateHook(milestones=(0.1, 0.2, 0.3, 0.4)), 'milestones'),
    (lambda: SARTargetRateHook(milestones=(0., 0.2, 0.5)), r'milestones\[0\]'),
    (lambda: SARTargetRateHook(milestones=(0.1, 0.2, 1.5)), r'milestones\[2\]'),
    (lambda: SARTargetRateHook(milestones=(0.1, NAN, 0.5)), r'milestones\[1\]'),
    (lambda: SARTargetRateHook(milestones=0.5), 'milestones'),
    (lambda: SARTargetRateHook(milestones='123'), 'milestones'),
    (lambda: SARTargetRateHook(milestones=(0.1, None, 0.5)), r'milestones\[1\]'),
    # Noise fade.
    (lambda: SARGumbelNoiseHook(begin=1.0), 'begin'),
    (lambda: SARGumbelNoiseHook(begin=-0.1), 'begin'),
    (lambda: SARGumbelNoiseHook(begin=NAN), 'begin'),
    (lambda: SARGumbelNoiseHook(begin=None), 'begin'),
    (lambda: SARGumbelNoiseHook(end=-0.1), 'end'),
    (lambda: SARGumbelNoiseHook(end=1.5), 'end'),
    (lambda: SARGumbelNoiseHook(end=INF), 'end'),
    # Reporting and distributed helpers.
    (lambda: SARRateLoggerHook(flops_input_shape=(3, 64)), 'flops_input_shape'),
    (lambda: SARRateLoggerHook(flops_input_shape=(3, 0, 64)), 'flops_input_shape'),
    (lambda: SARRateLoggerHook(flops_input_shape=(3, -64, 64)), 'flops_input_shape'),
    (lambda: SARRateLoggerHook(flops_input_shape=(3, 64.5, 64)), 'flops_input_shape'),
    (lambda: SARRateLoggerHook(flops_input_shape=224), 'flops_input_shape'),
    (lambda: SARRateLoggerHook(flops_input_shape='3x224x224'), 'flops_input_shape'),
    (lambda: SARRateLoggerHook(compute_flops='no'), 'compute_flops'),
    (lambda: SARRateSyncHook(prefixes=()), 'prefixes'),
    (lambda: SARRateSyncHook(prefixes=('act_rate', '')), 'prefixes'),
    (lambda: SARRateSyncHook(prefixes=3), 'prefixes'),
    (lambda: SARRateSyncHook(prefixes=[None]), 'prefixes'),
    (lambda: SARNoiseSeedHook(seed_data='yes'), 'seed_data'),
])
def test_hook_arguments_are_checked_when_built(build, name):
    with pytest.raises((TypeError, ValueError), match=name):
        build()


def test_hook_arguments_at_the_bounds_are_accepted():
    hook = SARTemperatureHook(start=MAX_TEMPERATURE, end=MIN_TEMPERATURE)
    assert hook.get_temperature(0.) == pytest.approx(MAX_TEMPERATURE)
    assert hook.get_temperature(1.) == pytest.approx(MIN_TEMPERATURE)
    assert SARTemperatureHook(start=np.float32(0.5), end=1).start == 0.5
    hook = SARTargetRateHook(target=1, milestones=[0.5, 0.5, 1])
    assert hook.get_target_rate(0.7) == 1.0 and hook.milestones == (0.5, 0.5, 1.0)
    assert SARGumbelNoiseHook(begin=0, end=1).get_noise_scale(0.5) == 1.0
    assert SARRateLoggerHook(flops_input_shape=[3, np.int64(64), 32]).flops_input_shape == \
        (3, 64, 32)
    assert SARRateSyncHook(prefixes='act').prefixes == ('act', )
    assert SARNoiseSeedHook(seed_data=False).seed_data is False


class Interrupt(Exception):
    """Stands for a killed job."""


class CrashAt(Hook):
    """Raises after iteration ``at`` (0-based)."""
    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == self.at:
            raise Interrupt


@pytest.mark.parametrize('by_epoch', [True, False], ids=['epoch_loop', 'iter_loop'])
def test_reused_model_starts_from_its_configuration_after_an_interrupted_run(tmp_path, by_epoch):
    """An interrupted run left t raised, tau annealed and the noise faded in the model
    object; a new run with that object sees what a fresh model would see."""
    fresh = RecordHook()
    make_runner(tmp_path / 'fresh', fresh, by_epoch=by_epoch).train()

    model = ToySARClassifier()
    backbone = model.backbone
    configured = (backbone.temperature, backbone.target_rate, backbone.noise_scale)
    with pytest.raises(Interrupt):
        make_runner(tmp_path / 'crashed', RecordHook(), by_epoch=by_epoch, model=model,
                    extra_hooks=[CrashAt(10)]).train()
    left = (backbone.temperature, backbone.target_rate, backbone.noise_scale)
    assert left[0] < 0.03 and left[2] < 0.4  # annealed and faded at iteration 10 of 12
    assert left[1] == pytest.approx(TARGET)  # ... (the step schedule is back at t there)
    # The case of the report: interrupted before the last milestone, t stays raised.
    with pytest.raises(Interrupt):
        make_runner(tmp_path / 'crashed2', RecordHook(), by_epoch=by_epoch, model=model,
                    extra_hooks=[CrashAt(2)]).train()
    assert backbone.target_rate == 1.0 and backbone.temperature < 1.0

    again = RecordHook()
    runner = make_runner(tmp_path / 'again', again, by_epoch=by_epoch, model=model)
    runner.train()
    # Every iteration saw the schedule of a fresh model, from the configured t = TARGET.
    assert again.seen == fresh.seen
    assert again.seen[0][:2] == (1.0, 1.0) and again.seen[11][1] == pytest.approx(TARGET)
    # After training: the configured values again (t: the final target, which is TARGET).
    assert (backbone.temperature, backbone.target_rate, backbone.noise_scale) == configured


def test_values_the_user_set_after_an_interrupted_run_are_kept(tmp_path):
    model = ToySARClassifier()
    backbone = model.backbone
    with pytest.raises(Interrupt):
        make_runner(tmp_path / 'crashed', RecordHook(), by_epoch=False, model=model,
                    extra_hooks=[CrashAt(1)]).train()
    assert backbone.target_rate == 1.0
    backbone.set_target_rate(0.3)  # a new t chosen on purpose: not a leftover
    # tau and the noise scale are still the interrupted run's: they are undone.
    assert undo_unfinished_run(backbone) == {'set_temperature': 1.0, 'set_noise_scale': 1.0}
    assert (backbone.temperature, backbone.target_rate, backbone.noise_scale) == (1.0, 0.3, 1.0)
    assert undo_unfinished_run(backbone) == {}

    record = RecordHook()
    make_runner(tmp_path / 'again', record, by_epoch=False, model=model).train()
    assert record.seen[11][1] == pytest.approx(0.3)  # the hook read t = 0.3 from the model
    assert backbone.target_rate == pytest.approx(0.3)
