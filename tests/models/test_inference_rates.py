"""Inference activation rates track the target t (issue 16).

Two kinds of tests:

* the new loss term against a hand computation: the deterministic-rate loss
  ``lambda_det * L_refine_det`` (ours), its straight-through gradient and its
  options, and the per-block threshold calibration;
* short trainings on the demo's generated shapes (test-sized: narrow SAR-ResNet18
  backbones, 40 iterations, stand-in task heads at each demo task's backbone
  settings: the classifier's 64x64 images and 4/4/2 patch grid, the
  detector's 128x128 scenes with 4/2/2-pixel patches and a multi-level dense
  objectness loss as an RPN would give, the segmentor's output-stride-8
  dilated backbone with a per-pixel loss), trained with the demo's recipe
  (annealed tau, Gumbel noise fade, lambda = lambda_det = 10, calibration on
  the last training batches): the held-out deterministic rate of every SAR
  stage lands within 0.1 of t and no block leaves [0.05, 0.95] at t = 0.5.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sar_backbones.engine.hooks import (_rate_threshold, calibrate_backbone, calibrate_thresholds,
                                        eval_margins)
from sar_backbones.models import SARResNet
from sar_backbones.models.backbones.sar_api import ForwardRecord
from sar_backbones.models.errors import InvalidArgumentError
from sar_backbones.models.layers import RegionSelector
from sar_backbones.models.layers.gumbel import deterministic_straight_through
from tools.datasets.generate_shape_datasets import classification_scene, detection_scene

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


# ----------------------------------------------------------- the loss terms
def test_deterministic_straight_through_matches_hand_computation():
    margin = torch.tensor([-3.0, -0.2, 0.0, 0.5, 4.0], requires_grad=True)
    tau = 2.0
    hard = deterministic_straight_through(margin, tau)
    assert hard.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # keep > skip, ties skip
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (hard * weights).sum().backward()
    s = torch.sigmoid(margin.detach() / tau)
    assert torch.allclose(margin.grad, weights * s * (1 - s) / tau, rtol=1e-6)


def _backbone(**kwargs):
    return SARResNet(depth=18, stem_channels=8, base_channels=8, mask_groups=2,
                     patch_grid=(2, 2, 1), target_rate=0.25, **kwargs)


@pytest.mark.parametrize('rate_loss', ['batch', 'sample'])
def test_deterministic_rate_loss_against_hand_computation(rate_loss):
    model = _backbone(rate_loss=rate_loss, rate_loss_weight=2.0, deterministic_rate_weight=3.0,
                      deterministic_rate_tau=0.5).train()
    model(torch.rand(2, 3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    # Hand-set margins (B=2, G=2) of the three masked blocks on their 2x2/2x2/1x1 grids.
    margins = [torch.randn(2, 2, 2, 2, generator=gen).requires_grad_(),
               torch.randn(2, 2, 2, 2, generator=gen).requires_grad_(),
               torch.randn(2, 2, 1, 1, generator=gen).requires_grad_()]
    model._record = ForwardRecord(model._record.masks, model._record.input_finite,
                                  tuple(margins))
    losses = model.get_aux_losses()

    t = 0.25
    rates = torch.tensor([[float((m[b] > 0).float().mean()) for m in margins]
                          for b in range(2)])  # (B, N)
    if rate_loss == 'batch':
        want = sum((rates[:, n].mean() - t)**2 for n in range(3)) / 3  # Eq. 10
    else:
        want = sum((rates[b, n] - t)**2 for b in range(2) for n in range(3)) / 6  # Eq. 11
    assert float(losses['loss_act_rate_det']) == pytest.approx(3.0 * float(want), rel=1e-6)
    assert float(losses['act_rate_det']) == pytest.approx(float(rates.mean()), rel=1e-6)
    assert float(losses['act_rate_det_stage3']) == pytest.approx(float(rates[:, 2].mean()))

    losses['loss_act_rate_det'].backward()
    for n, m in enumerate(margins):
        s = torch.sigmoid(m.detach() / 0.5)
        slope = s * (1 - s) / 0.5 / m[0].numel()  # d r_{b,n} / d margin
        if rate_loss == 'batch':
            outer = 3.0 * 2 * (rates[:, n].mean() - t) / 3 / 2  # d L / d r_{b,n}
            want_grad = outer * slope
        else:
            outer = 3.0 * 2 * (rates[:, n] - t) / 6
            want_grad = outer.view(2, 1, 1, 1) * slope
        assert torch.allclose(m.grad, want_grad, rtol=1e-5, atol=1e-8), n


def test_paper_default_adds_no_deterministic_term_but_logs_its_rate():
    model = _backbone().train()
    model(torch.rand(2, 3, 32, 32))
    losses = model.get_aux_losses()
    assert 'loss_act_rate_det' not in losses  # the paper's loss alone
    assert 0 <= float(losses['act_rate_det']) <= 1
    assert 'act_rate_det' not in model.eval().get_aux_losses()


@pytest.mark.parametrize('kwargs, name', [
    (dict(deterministic_rate_weight=-1.0), 'deterministic_rate_weight'),
    (dict(deterministic_rate_weight=float('nan')), 'deterministic_rate_weight'),
    (dict(deterministic_rate_weight='1'), 'deterministic_rate_weight'),
    (dict(deterministic_rate_weight=True), 'deterministic_rate_weight'),
    (dict(deterministic_rate_tau=0.0), 'deterministic_rate_tau'),
    (dict(deterministic_rate_tau=1e9), 'deterministic_rate_tau'),
])
def test_rate_options_are_checked_by_name(kwargs, name):
    with pytest.raises(InvalidArgumentError, match=name):
        _backbone(**kwargs)


def test_calibration_sets_each_block_to_the_target_on_its_data():
    torch.manual_seed(0)
    # Residual branches not zeroed: the selectors' inputs vary over the image.
    model = _backbone(zero_init_residual=False)
    for module in model.modules():  # input-dependent selectors, as after training
        if isinstance(module, RegionSelector):
            module.fc.weight.data.normal_(std=5.)
            module.norm.bias.data.fill_(1.)
    inputs = torch.rand(8, 3, 32, 32)
    after = {}
    shifts, before = calibrate_backbone(model, lambda: [inputs[:4], inputs[4:]], 0.25,
                                        after=after)
    assert sorted(shifts) == [0, 1, 2] and all(len(v) == 2 for v in shifts.values())
    assert sorted(after) == [0, 1, 2]
    # The calibrated model's own eval margins (a stage's masks feed the next stage).
    margins = eval_margins(model, inputs)
    model.eval()
    with torch.no_grad():
        model(inputs)
    checked = 0
    for block, mask in enumerate(model.get_masks()):
        per_group = mask.transpose(0, 1).flatten(1).mean(1)  # (G,)
        groups = margins[block].detach().transpose(0, 1).flatten(1)  # (G, M)
        # Inference (stacked selectors, BN folded) selects what the margins say ...
        assert torch.equal(per_group, (groups > 0).float().mean(1)), block
        for group, values in enumerate(groups):
            if len(values.unique()) == len(values):  # ... which is t when no margins tie
                checked += 1
                assert abs(float(per_group[group]) - 0.25) <= 1 / len(values) + 1e-6
    assert checked >= 2
    with pytest.raises(ValueError, match='3 masked blocks'):
        calibrate_thresholds(model, {5: margins[0].transpose(0, 1).flatten(1)}, 0.25)


def test_calibration_reports_the_rate_it_reached_when_margins_tie():
    """Ties no threshold splits: the rate after calibration is measured, not assumed t."""
    model = _backbone()
    tied = torch.tensor([[3., 1., 1., 1., 1., 1., 1., -2.]] * 2, dtype=torch.float64)
    spread = torch.arange(16, dtype=torch.float64).view(2, 8)
    after = {}
    calibrate_thresholds(model, {0: tied, 1: spread}, 0.5, after)
    assert after[1] == 0.5
    assert after[0] in (0.125, 0.875)  # the tie of six moves together, away from t


@pytest.mark.parametrize('values, target, want', [
    ([3., 1., 2., 0.], 0.5, 2),          # plain: the two largest
    ([5., 1., 1., 1., 1., 0.], 0.5, 1),  # tie at the boundary: nearer end (1 of 6, not 5)
    ([1., 1., 1., 1.], 0.5, 0),          # all tied: 0 and 4 equally far, the lower
    ([2., 1.], 1.0, 2),
    ([2., 1.], 0.1, 0),
])
def test_rate_threshold_splits_between_margins(values, target, want):
    values = torch.tensor(values, dtype=torch.float64)
    threshold = _rate_threshold(values, target)
    assert int((values > threshold).sum()) == want


# ------------------------------------------ short trainings on demo data
def _image(array) -> torch.Tensor:
    return (torch.from_numpy(array).permute(2, 0, 1).float() - MEAN) / STD


def _classification(split: str, per_class: int):
    images, labels = [], []
    for index in range(per_class):
        for label in range(5):
            scene = classification_scene(0, split, label, index, size=64)
            images.append(_image(scene.image))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _scenes(split: str, count: int, size: int):
    images, targets = [], []
    for index in range(count):
        scene = detection_scene(0, split, index, size_range=(size, size))
        images.append(_image(scene.image))
        semantic = torch.zeros(size, size, dtype=torch.long)
        instance = torch.from_numpy(scene.instance_map.astype('int64'))
        for obj, label in enumerate(scene.labels):
            semantic[instance == obj] = label + 1
        targets.append(semantic)
    return torch.stack(images), torch.stack(targets)


class ClassifierHead(nn.Module):

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, 5)

    def forward(self, feats, target):
        return F.cross_entropy(self.fc(feats[-1].mean((2, 3))), target)


class ObjectnessHead(nn.Module):
    """Dense objectness on every level (an RPN's classification loss, anchor-free)."""

    def __init__(self, channels):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in channels)

    def forward(self, feats, target):
        foreground = (target > 0).float().unsqueeze(1)
        loss = 0.
        for conv, feat in zip(self.convs, feats):
            level = F.adaptive_max_pool2d(foreground, feat.shape[-2:])
            loss = loss + F.binary_cross_entropy_with_logits(conv(feat), level)
        return loss


class SegmentationHead(nn.Module):

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 6, 1)

    def forward(self, feats, target):
        logits = F.interpolate(self.conv(feats[-1]), target.shape[-2:], mode='bilinear',
                               align_corners=False)
        return F.cross_entropy(logits, target)


def _train_and_measure(backbone, head, train, held_out, iters=40, batch=8):
    """The demo's short recipe; returns held-out per-block deterministic rates."""
    torch.manual_seed(0)
    selectors = [p for n, p in backbone.named_parameters() if '.selectors.' in n]
    others = [p for n, p in backbone.named_parameters() if '.selectors.' not in n]
    optimizer = torch.optim.SGD([
        dict(params=others + list(head.parameters())),
        dict(params=selectors, lr=0.2, weight_decay=0.)], lr=0.05, momentum=0.9,
        weight_decay=5e-4)
    images, targets = train
    gen = torch.Generator().manual_seed(0)
    for it in range(iters):
        progress = it / iters
        backbone.set_temperature(5.0 * (0.1 / 5.0)**progress)  # tau 5 -> 0.1 (demo)
        backbone.set_noise_scale(1.0 if progress <= 0.5 else 1 - (progress - 0.5) / 0.5)
        index = torch.randint(len(images), (batch, ), generator=gen)
        backbone.train()
        feats = backbone(images[index])
        aux = backbone.get_aux_losses()
        loss = head(feats, targets[index]) + sum(v for k, v in aux.items() if 'loss' in k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # SARRateCalibrationHook on the last epoch's batches: the training set once.
    calibrate_backbone(backbone, lambda: images.split(batch), backbone.target_rate)
    backbone.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(held_out), 10):
            backbone(held_out[start:start + 10])
            rows.append(backbone.get_activation_rates())
    return torch.cat(rows).mean(0)


def _check_rates(backbone, block_rates, task):
    t = backbone.target_rate
    stage_rates = [float(block_rates[cols].mean()) for cols in backbone.stage_block_slices()]
    assert all(abs(r - t) <= 0.1 for r in stage_rates), (task, stage_rates, t)
    assert all(0.05 <= float(r) <= 0.95 for r in block_rates), (task, block_rates.tolist())


def _sar(**kwargs):
    torch.manual_seed(0)
    return SARResNet(depth=18, stem_channels=8, base_channels=8, mask_groups=1, target_rate=0.5,
                     rate_loss_weight=10.0, deterministic_rate_weight=10.0, **kwargs)


def test_classifier_inference_rates_track_target():
    backbone = _sar(patch_grid=(4, 4, 2), out_indices=(3, ))
    rates = _train_and_measure(backbone, ClassifierHead(64), _classification('train', 12),
                               _classification('val', 16)[0])
    _check_rates(backbone, rates, 'classifier')


def test_detector_inference_rates_track_target():
    backbone = _sar(patch_size=(4, 2, 2))
    train = _scenes('train', 40, 128)
    rates = _train_and_measure(backbone, ObjectnessHead([8, 16, 32, 64]), train,
                               _scenes('val', 80, 128)[0], batch=6)
    _check_rates(backbone, rates, 'detector')


def test_segmentor_inference_rates_track_target():
    # mmseg's output stride 8 (strides 1,2,1,1 and dilations 1,1,2,4), as the demo.
    backbone = _sar(patch_size=(4, 2, 2), strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                    out_indices=(3, ))
    train = _scenes('train', 40, 96)
    rates = _train_and_measure(backbone, SegmentationHead(64), train,
                               _scenes('val', 80, 96)[0], batch=6)
    _check_rates(backbone, rates, 'segmentor')
