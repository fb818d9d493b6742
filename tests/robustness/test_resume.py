"""An interrupted training run resumes exactly where it stopped (real mmengine Runner).

One run trains 4 iterations without a break. A second run, identical, saves
a checkpoint after iteration 2 and crashes during iteration 3 (after its
optimizer step, which is therefore lost); a third runner resumes it from the
last checkpoint. The resumed run must end in exactly the state of the
uninterrupted one: iteration count, weights, optimizer and LR-scheduler
state, Gumbel temperature, target rate and the logged loss history.

The model is mmpretrain's classifier with a narrow SAR-ResNet18 whose region
selectors have been perturbed so that the Gumbel noise really decides masks
(at initialisation every region is selected whatever the noise).
"""
import copy
import random
import uuid

import numpy as np
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmpretrain.structures import DataSample
from torch.utils.data import Dataset

import sar_backbones  # noqa: F401  (registries, torch.load compat patch)
from sar_backbones.engine import get_sar_backbone
from sar_backbones.registry import MODELS

MAX_ITERS = 4
CHECKPOINT_INTERVAL = 2
TARGET = 0.4
MILESTONES = (0.25, 0.5, 0.75)  # the target steps at iterations 1, 2 and 3


class ToyImages(Dataset):
    """Sixteen random 32x32 uint8 images in three classes, as mmpretrain packs them."""

    def __init__(self, size=16, side=32, num_classes=3):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (size, 3, side, side), generator=generator,
                                    dtype=torch.uint8)
        self.labels = torch.randint(0, num_classes, (size, ), generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        sample = DataSample().set_gt_label(int(self.labels[index]))
        return dict(inputs=self.images[index].clone(), data_samples=sample)


MODEL = dict(
    type='sar_backbones.SARImageClassifier',
    data_preprocessor=dict(type='mmpretrain.ClsDataPreprocessor', num_classes=3,
                           mean=[127.5] * 3, std=[64.0] * 3),
    backbone=dict(type='sar_backbones.SARResNet', depth=18, stem_channels=16, base_channels=16,
                  groups=2, patch_grid=(4, 2, 1), target_rate=TARGET, rate_loss_weight=1.0,
                  out_indices=(3, )),
    neck=dict(type='mmpretrain.GlobalAveragePooling'),
    head=dict(type='mmpretrain.LinearClsHead', num_classes=3, in_channels=128))


def build_model():
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(MODEL))
    # Balanced skip/keep logits driven by the features: the noise matters.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in model.backbone.sar_stages:
            for selector in stage.selectors:
                selector.fc.weight.normal_(0, 2.0, generator=generator)
                selector.fc.bias.zero_()
    return model


class Interrupt(Exception):
    """Stands for a killed job."""


class CrashAfter(Hook):
    """Raise at the end of iteration ``runner.iter == at`` (0-based), after its update."""
    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == self.at:
            raise Interrupt(f'killed during iteration {runner.iter + 1}')


class SeenHook(Hook):
    """Records iteration -> (tau, target) as the backbone sees them in the forward."""
    priority = 'LOW'

    def __init__(self):
        self.seen = {}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        backbone = get_sar_backbone(runner.model)
        self.seen[runner.iter] = (backbone.temperature, backbone.target_rate)


class AugmentedToyImages(ToyImages):
    """ToyImages with a random flip (Python's ``random``), a random 32x32 crop of the
    4-pixel padded image (NumPy) and random brightness (PyTorch), drawn from the global
    generators as OpenMMLab's transforms do."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        image = item['inputs']
        if random.random() < 0.5:
            image = image.flip(-1)
        top, left = np.random.randint(0, 9, size=2)
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
        image = padded[:, top:top + 32, left:left + 32]
        shift = torch.randint(-30, 31, ())
        item['inputs'] = (image.int() + shift).clamp(0, 255).to(torch.uint8)
        return item


def make_runner(work_dir, extra_hooks=(), resume=False, by_epoch=False, augment=False,
                seed_data=True):
    dataset = AugmentedToyImages(size=8) if augment else ToyImages()
    if by_epoch:
        # Two epochs of two iterations; checkpoints at the end of each epoch.
        loop = dict(train_cfg=dict(by_epoch=True, max_epochs=MAX_ITERS // 2),
                    sampler=dict(type='DefaultSampler', shuffle=True),
                    checkpoint=dict(type='CheckpointHook', interval=1))
    else:
        loop = dict(train_cfg=dict(by_epoch=False, max_iters=MAX_ITERS),
                    sampler=dict(type='InfiniteSampler', shuffle=True),
                    checkpoint=dict(type='CheckpointHook', interval=CHECKPOINT_INTERVAL,
                                    by_epoch=False))
    return Runner(
        model=build_model(),
        work_dir=str(work_dir),
        # A unique name: runners created in the same second would otherwise share
        # one MessageHub (and logger) instance, named after the timestamp.
        experiment_name=f'resume_test_{uuid.uuid4().hex}',
        default_scope='mmpretrain',
        train_dataloader=dict(dataset=dataset, batch_size=4, num_workers=0,
                              sampler=loop['sampler']),
        train_cfg=loop['train_cfg'],
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9, nesterov=True,
                                          weight_decay=1e-4)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.25, by_epoch=False, begin=0, end=2),
            dict(type='CosineAnnealingLR', by_epoch=False, begin=2, end=MAX_ITERS),
        ],
        default_hooks=dict(checkpoint=loop['checkpoint'],
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[
            dict(type='sar_backbones.SARTemperatureHook', start=1.0, end=0.01),
            dict(type='sar_backbones.SARTargetRateHook', milestones=MILESTONES),
            dict(type='sar_backbones.SARNoiseSeedHook', seed_data=seed_data),
            *extra_hooks,
        ],
        resume=resume,
        randomness=dict(seed=0, deterministic=True),
        log_level='WARNING')


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _assert_nested_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_nested_equal(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f'{where}[{index}]')
    else:
        assert a == b, (where, a, b)


def test_interrupted_run_resumes_exactly(tmp_path, restore_determinism):
    full_seen = SeenHook()
    full = make_runner(tmp_path / 'full', [full_seen])
    full.train()

    work_dir = tmp_path / 'interrupted'
    with pytest.raises(Interrupt):
        make_runner(work_dir, [CrashAfter(at=CHECKPOINT_INTERVAL)]).train()
    # Only the checkpoint after iteration 2 exists; iteration 3's update is lost.
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith(
        f'iter_{CHECKPOINT_INTERVAL}.pth')
    assert not (work_dir / f'iter_{CHECKPOINT_INTERVAL + 1}.pth').exists()

    resumed_seen = SeenHook()
    resumed = make_runner(work_dir, [resumed_seen], resume=True)  # from last_checkpoint
    resumed.train()

    # Iteration count: the resumed run did iterations 3 and 4 only, and ends at 4.
    assert full.iter == resumed.iter == MAX_ITERS
    assert sorted(full_seen.seen) == list(range(MAX_ITERS))
    assert sorted(resumed_seen.seen) == list(range(CHECKPOINT_INTERVAL, MAX_ITERS))
    # Temperature and target rate of every resumed iteration, then after training.
    for it, values in resumed_seen.seen.items():
        assert values == full_seen.seen[it], it
    taus = [full_seen.seen[it][0] for it in range(MAX_ITERS)]
    targets = [full_seen.seen[it][1] for it in range(MAX_ITERS)]
    assert taus == sorted(taus, reverse=True) and len(set(taus)) == MAX_ITERS
    assert targets == pytest.approx([1.0, 0.8, 0.6, TARGET])
    full_bb, resumed_bb = get_sar_backbone(full.model), get_sar_backbone(resumed.model)
    assert resumed_bb.temperature == full_bb.temperature
    assert resumed_bb.target_rate == full_bb.target_rate == TARGET

    # The masks were partial and random: the resumed run reproduced the noise.
    rates = full.message_hub.get_scalar('train/act_rate').data[0]
    assert 0.05 < rates.min() and rates.max() < 0.95, rates

    # Weights (parameters and BN statistics), bit for bit.
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert list(full_state) == list(resumed_state)
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key
    # Optimizer (momentum buffers, LR) and LR-scheduler state.
    _assert_nested_equal(full.optim_wrapper.state_dict(), resumed.optim_wrapper.state_dict(),
                         'optimizer')
    assert full.optim_wrapper.get_lr() == resumed.optim_wrapper.get_lr()
    _assert_nested_equal([s.state_dict() for s in full.param_schedulers],
                         [s.state_dict() for s in resumed.param_schedulers], 'param_schedulers')
    # Logged history: the resumed run's losses, rates, tau and target of all 4 iterations
    # (2 from the checkpoint's message hub, 2 computed) equal the uninterrupted ones.
    for key in ('train/loss', 'train/loss_act_rate', 'train/act_rate', 'train/tau',
                'train/target_rate', 'train/lr'):
        want, got = (r.message_hub.get_scalar(key).data[0] for r in (full, resumed))
        assert len(want) == MAX_ITERS and want.tolist() == got.tolist(), key

    # The final checkpoints agree as well (what a later resume or test would load).
    final = f'iter_{MAX_ITERS}.pth'
    ckpt_full = torch.load(tmp_path / 'full' / final, map_location='cpu', weights_only=False)
    ckpt_resumed = torch.load(work_dir / final, map_location='cpu', weights_only=False)
    assert ckpt_full['meta']['iter'] == ckpt_resumed['meta']['iter'] == MAX_ITERS
    _assert_nested_equal(ckpt_full['state_dict'], ckpt_resumed['state_dict'], 'state_dict')
    _assert_nested_equal(ckpt_full['optimizer'], ckpt_resumed['optimizer'], 'optimizer')


def test_noise_seed_depends_only_on_seed_rank_and_iteration():
    from sar_backbones.engine.distributed_hooks import SARNoiseSeedHook

    seed = SARNoiseSeedHook.iteration_seed
    assert seed(0, 3) == seed(0, 3) == seed(0, 3, rank=0, stream=0)
    values = {seed(s, it, rank, stream) for s in (0, 1, 2**40) for it in range(20)
              for rank in range(4) for stream in (0, 1)}
    assert len(values) == 3 * 20 * 4 * 2 and all(0 <= v < 2**63 for v in values)
    with pytest.raises(ValueError, match='rank'):
        seed(0, 3, rank=-1)
    with pytest.raises(ValueError, match='iteration'):
        seed(0, -1)
    with pytest.raises(TypeError, match='iteration'):
        seed(0, 1.5)


def _train_interrupted_and_resumed(tmp_path, **kwargs):
    """(uninterrupted runner, resumed runner): crash during iteration 3, resume from 2."""
    full = make_runner(tmp_path / 'full', **kwargs)
    full.train()
    work_dir = tmp_path / 'interrupted'
    with pytest.raises(Interrupt):
        make_runner(work_dir, [CrashAfter(at=CHECKPOINT_INTERVAL)], **kwargs).train()
    resumed = make_runner(work_dir, resume=True, **kwargs)
    resumed.train()
    assert full.iter == resumed.iter == MAX_ITERS
    return full, resumed


def _same_weights(a, b):
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(value, state_b[key]) for key, value in state_a.items())


@pytest.mark.parametrize('by_epoch', [False, True], ids=['iter_loop', 'epoch_loop'])
def test_resume_with_augmentation_in_the_main_process_is_exact(tmp_path, by_epoch,
                                                               restore_determinism):
    """num_workers=0 with random flips (random), crops (NumPy) and brightness (PyTorch):
    SARNoiseSeedHook seeds all three before every batch is loaded."""
    full, resumed = _train_interrupted_and_resumed(tmp_path, by_epoch=by_epoch, augment=True)
    assert _same_weights(full, resumed)
    _assert_nested_equal(full.optim_wrapper.state_dict(), resumed.optim_wrapper.state_dict(),
                         'optimizer')
    for key in ('train/loss', 'train/act_rate'):
        want, got = (r.message_hub.get_scalar(key).data[0] for r in (full, resumed))
        assert want.tolist() == got.tolist(), key


@pytest.mark.parametrize('by_epoch', [False, True], ids=['iter_loop', 'epoch_loop'])
def test_resume_with_augmentation_differs_without_data_seeding(tmp_path, by_epoch,
                                                               restore_determinism):
    """Why the data seeding is needed: checkpoints hold no generator state. The epoch
    loop restarts from the generators seeded when the runner was built; the iteration
    loop re-fetches the trained batches (replaying random/NumPy draws of the pipeline)
    but PyTorch's generator was reseeded and used by every training iteration."""
    full, resumed = _train_interrupted_and_resumed(tmp_path, by_epoch=by_epoch, augment=True,
                                                   seed_data=False)
    losses = [r.message_hub.get_scalar('train/loss').data[0].tolist() for r in (full, resumed)]
    # Identical up to the checkpoint (the resumed hub holds the first run's values) ...
    assert losses[0][:CHECKPOINT_INTERVAL] == losses[1][:CHECKPOINT_INTERVAL]
    # ... then other augmentations: other losses and weights.
    assert losses[0][CHECKPOINT_INTERVAL] != losses[1][CHECKPOINT_INTERVAL]
    assert not _same_weights(full, resumed)
