"""tools/analysis/get_flops.py: fields, agreement with model_complexity, measured statistics."""
import json

import pytest
import torch

from sar_backbones.analysis import model_complexity
from sar_backbones.analysis.flops_stats import folder_inputs, measure_rates, rate_statistics
from tools.analysis.model_builders import build_preset_backbone, parse_preset
from .tool_helpers import CLASSIFIER, DEEPLABV3, FASTER_RCNN, load_tool

get_flops = load_tool('get_flops')

TOP_FIELDS = {'task', 'input_shape', 'params', 'params_model', 'flops_dense', 'flops_static',
              'flops_refine', 'flops_refine_per_stage', 'assumed', 'reference', 'unit'}
MEASURED_FIELDS = {'num_images', 'params', 'activation_rate', 'stage_rates', 'block_rates',
                   'target_rate', 'max_stage_deviation',
                   'flops', 'flops_dense', 'flops_static', 'per_image', 'histogram',
                   'reference_flops', 'flops_ratio'}


def test_parse_preset():
    assert parse_preset('sar-resnet50-g2s2a2b1') == dict(
        depth=50, mask_groups=2, base_stride=2, alpha=2, beta=1)
    assert parse_preset('sar-resnetv1c50-g2s4a1b1-t0.5') == dict(
        depth=50, mask_groups=2, base_stride=4, alpha=1, beta=1, deep_stem=True, target_rate=0.5)
    with pytest.raises(ValueError, match='unknown preset'):
        parse_preset('resnet50')


def test_preset_assumed_rates_agree_with_model_complexity(tmp_path):
    out = tmp_path / 'flops.json'
    result = get_flops.main(['--preset', 'sar-resnet18-g2s2a2b1', '--shape', '64',
                             '--rate', '0.3', '0.5', '1.0', '--out', str(out)])
    assert TOP_FIELDS <= set(result)
    assert json.loads(out.read_text())['assumed'] == result['assumed']
    model = build_preset_backbone('sar-resnet18-g2s2a2b1')
    for entry in result['assumed']:
        expected = model_complexity(model, (3, 64, 64), activation_rate=entry['rate'])
        assert entry['flops'] == pytest.approx(expected['flops'], rel=1e-12)
        assert entry['flops_ratio_vs_reference'] == pytest.approx(
            expected['flops'] / result['reference']['flops'])
    assert result['params'] == expected['params']
    assert result['flops_dense'] == pytest.approx(expected['flops_dense'])
    assert sum(result['flops_refine_per_stage']) == pytest.approx(sum(expected['flops_refine']))


def test_classifier_config_matches_the_paper_figures():
    result = get_flops.main([str(CLASSIFIER), '--rate', '0.5'])
    assert result['task'] == 'classifier' and result['num_classes'] == 1000
    assert result['params'] / 1e6 == pytest.approx(25.02, abs=0.01)
    assert result['assumed'][0]['flops'] / 1e9 == pytest.approx(1.857 + 0.5 * 1.047, rel=0.01)
    assert result['reference']['flops'] / 1e9 == pytest.approx(4.09, rel=0.005)


def test_detector_config_backbone_at_a_custom_shape():
    result = get_flops.main([str(FASTER_RCNN), '--shape', '96', '128', '--rate', '0.5'])
    assert result['task'] == 'detector' and result['num_classes'] is None
    assert result['input_shape'] == [3, 96, 128]
    assert result['params_model'] > result['params']  # neck and heads are not in the count
    assert result['flops_static'] < result['assumed'][0]['flops'] < result['flops_dense']


def test_measured_on_images_agrees_with_model_complexity(tmp_path, tiny_imagenet):
    out = tmp_path / 'measured.json'
    result = get_flops.main(['--preset', 'sar-resnet18-g2s2a2b1', '--shape', '64',
                             '--images', str(tiny_imagenet / 'val'), '--num-images', '3',
                             '--out', str(out)])
    measured = result['measured']
    assert MEASURED_FIELDS <= set(measured)
    assert measured['num_images'] == 3 and len(measured['per_image']) == 3
    assert len(measured['stage_rates']) == 3
    assert (tmp_path / 'measured_hist.png').stat().st_size > 0
    # Untrained selectors keep everything: the measured cost is the dense cost.
    model = build_preset_backbone('sar-resnet18-g2s2a2b1')
    dense = model_complexity(model, (3, 64, 64))
    assert measured['activation_rate']['mean'] == pytest.approx(1.0)
    assert measured['flops']['mean'] == pytest.approx(dense['flops'])


def test_rate_statistics_uses_each_images_own_rates(tiny_imagenet):
    model = build_preset_backbone('sar-resnet18-g2s2a2b1')
    inputs = list(folder_inputs(str(tiny_imagenet / 'val'), (64, 64), limit=2))
    measured = measure_rates(model, inputs)
    n = model.num_masked_blocks
    measured['rates'] = torch.tensor([[0.25] * n, [0.75] * n], dtype=torch.float64)
    stats = rate_statistics(model, measured)
    expected = model_complexity(model, (3, 64, 64), activation_rate=measured['rates'])
    assert [p['flops'] for p in stats['per_image']] == pytest.approx(expected['flops_per_image'])
    assert stats['activation_rate']['mean'] == pytest.approx(0.5)
    assert stats['activation_rate']['std'] == pytest.approx(0.25)
    assert stats['flops']['mean'] == pytest.approx(expected['flops'])
    # Stage rates: the unweighted mean of the stage's block rates (act_rate_stage{i}).
    measured['rates'] = torch.arange(2 * n, dtype=torch.float64).view(2, n) / (2 * n)
    stats = rate_statistics(model, measured)
    for cols, stage in zip(model.stage_block_slices(), stats['stage_rates']):
        assert stage['mean'] == pytest.approx(float(measured['rates'][:, cols].mean()))
    assert stats['target_rate'] == model.target_rate
    assert stats['max_stage_deviation'] == pytest.approx(
        max(abs(s['mean'] - model.target_rate) for s in stats['stage_rates']))
    text = get_flops.format_result(dict(
        config='c', task='classifier', input_shape=[3, 64, 64], num_classes=None, params=1,
        params_model=1, flops_dense=1, flops_static=1, flops_refine_per_stage=[1], assumed=[],
        measured=dict(stats, histogram='h.png')))
    stage_line = [line for line in text.splitlines()
                  if line.startswith('per-stage inference rates: ')]
    assert stage_line == ['per-stage inference rates: ' + ' / '.join(
        f"{s['mean']:.3f}" for s in stats['stage_rates'])
        + f" (target t={model.target_rate:.3f}, max |stage rate - t| = "
        f"{stats['max_stage_deviation']:.3f})"]
    assert 'per-block: ' + ' / '.join(f'{r:.3f}' for r in stats['block_rates']) in text


def test_measured_on_the_config_dataloader(tmp_path, tiny_imagenet):
    result = get_flops.main([
        str(CLASSIFIER), '--dataloader', '--num-images', '2', '--out', str(tmp_path / 'dl.json'),
        '--cfg-options', f'test_dataloader.dataset.data_root={tiny_imagenet}',
        'test_dataloader.dataset.split=val'])
    measured = result['measured']
    assert measured['num_images'] == 2
    assert measured['per_image'][0]['shape'] == [3, 224, 224]  # the test pipeline's crop
    assert (tmp_path / 'dl_hist.png').exists()


def test_segmentor_config_is_compared_with_the_dilated_resnet():
    result = get_flops.main([str(DEEPLABV3), '--shape', '128', '--rate', '0.5', '1.0'])
    assert result['task'] == 'segmentor'
    assert 'ResNetV1c' in result['reference']['model']  # deep stem, OS8 like the SAR backbone
    assert 0 < result['assumed'][0]['flops_ratio_vs_reference'] < 1
    assert result['assumed'][0]['flops'] < result['assumed'][1]['flops'] == result['flops_dense']


CONFIGS = CLASSIFIER.parents[1]
SAR_MOBILENET = CONFIGS / 'sar_mobilenet_v2' / 'sar-mobilenet-v2-g2s2a2b1-t0.5_8xb32_in1k.py'
SAR_MOBILENET_SEG = (CONFIGS / 'deeplabv3' /
                     'deeplabv3_sar-mobilenet-v2-g2s2a2b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py')
SAR_RESNEXT = CONFIGS / 'sar_resnext' / 'sar-resnext50-32x4d-g2s2a2b1-t0.5_8xb32_in1k.py'


def test_sar_mobilenet_v2_is_compared_with_mobilenet_v2():
    result = get_flops.main([str(SAR_MOBILENET), '--rate', '0.5'])
    assert result['num_classes'] == 1000
    assert result['reference']['model'] == 'mmpretrain MobileNetV2 1x (with head)'
    # MobileNetV2 1.0 with its head: 300.8 MMACs (the published 300 MFLOPs).
    assert result['reference']['flops'] == 300836992
    assert result['params'] / 1e6 == pytest.approx(3.54, abs=0.005)
    assert result['assumed'][0]['flops'] / 1e9 == pytest.approx(0.196 + 0.5 * 0.0674, abs=1e-3)
    assert 0.2 < result['assumed'][0]['flops_reduction_vs_reference'] < 0.3


def test_sar_mobilenet_v2_os8_is_compared_with_the_dilated_mobilenet_v2():
    result = get_flops.main([str(SAR_MOBILENET_SEG), '--shape', '96', '--rate', '1.0'])
    assert result['reference']['model'].startswith('mmseg MobileNetV2 1x (strides (1, 2, 2, 1')
    from mmseg.models.backbones import MobileNetV2

    from sar_backbones.analysis import count_macs
    plain = MobileNetV2(strides=(1, 2, 2, 1, 1, 1, 1), dilations=(1, 1, 1, 2, 2, 4, 4))
    plain.eval()
    assert result['reference']['flops'] == count_macs(plain, (3, 96, 96))[0]


def test_sar_resnext_is_compared_with_resnext():
    result = get_flops.main([str(SAR_RESNEXT), '--rate', '0.5'])
    assert result['reference']['model'] == 'mmdet ResNeXt-50 32x4d (with head)'
    assert result['reference']['flops'] / 1e9 == pytest.approx(4.232, abs=1e-3)
    assert result['assumed'][0]['flops_reduction_vs_reference'] == pytest.approx(0.396, abs=1e-3)
    # Dilated (OS8): mmseg's ResNeXt, whose contract_dilation matches the SAR backbone's.
    from sar_backbones.models import SARResNeXt
    sar = SARResNeXt(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                     contract_dilation=True, patch_grid=None, patch_size=(4, 4, 7))
    model, name = get_flops.reference_model(sar)
    assert name == 'mmseg ResNeXt-50 32x4d (backbone)' and model.contract_dilation
