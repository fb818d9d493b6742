"""tools/analysis/benchmark_latency.py and its helpers on a tiny model (no timing asserted)."""
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import sar_backbones
from benchmarks.latency import fold_batchnorm, format_headroom, target_headroom
from benchmarks.parts import PartTimer, group_parts, sar_parts
from benchmarks.timing import (conv_backend, interleaved_timing, max_relative_error, parse_size,
                               summarize)
from sar_backbones.analysis import model_complexity
from tools.analysis.model_builders import build_preset_backbone, torchvision_resnet
from .tool_helpers import load_tool

benchmark_latency = load_tool('benchmark_latency')

ROW_FIELDS = {'model', 'family', 'depth', 'mode', 'rate', 'bn_fold', 'size', 'threads',
              'median_ms', 'p25_ms', 'p75_ms', 'min_ms', 'max_ms', 'std_ms', 'reps',
              'ratio_vs_resnet', 'ratio_vs_resnet_plain', 'ratio_vs_resnet_fold',
              'min_ratio_vs_resnet', 'cpu_median_ms', 'cpu_ratio_vs_resnet', 'flops',
              'flops_ratio'}


def _randomise_norms(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator))
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(shape, generator=generator))
            module.bias.data.copy_(torch.randn(shape, generator=generator))


def test_summarize_and_interleaved_timing():
    stats = summarize([0.003, 0.001, 0.002, 0.004])
    assert stats['median_ms'] == pytest.approx(2.5)
    assert stats['min_ms'] == pytest.approx(1.0) and stats['max_ms'] == pytest.approx(4.0)
    assert stats['p25_ms'] <= stats['median_ms'] <= stats['p75_ms'] and stats['reps'] == 4
    calls = []
    cases = OrderedDict((name, (lambda n=name: calls.append(n))) for name in 'abc')
    cpu = {}
    samples = interleaved_timing(cases, reps=3, warmup=1, cpu_samples=cpu)
    assert {k: len(v) for k, v in samples.items()} == {'a': 3, 'b': 3, 'c': 3}
    assert set(cpu) == set(samples) and len(calls) == 12
    assert parse_size('224') == (224, 224) and parse_size('800x1216') == (800, 1216)


@pytest.mark.parametrize('depth', [18, 50])
def test_fold_batchnorm_keeps_the_function(depth):
    x = torch.randn(1, 3, 64, 64)
    resnet = torchvision_resnet(depth)
    _randomise_norms(resnet)
    folded = fold_batchnorm(resnet)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert max_relative_error(folded(x), resnet(x)) < 1e-4
    sar = build_preset_backbone(f'sar-resnet{depth}-g2s2a2b1')
    _randomise_norms(sar)
    sar_folded = fold_batchnorm(sar)
    with torch.no_grad():
        for mode in ('dense', 'sparse'):
            for model in (sar, sar_folded):
                model.set_inference_mode(mode)
                model.set_mask_override(0.5)
            assert max_relative_error(sar_folded(x), sar(x)) < 1e-4, mode


def test_part_timer_covers_the_forward():
    model = build_preset_backbone('sar-resnet18-g2s2a2b1')
    model.set_mask_override(0.5)
    x = torch.randn(1, 3, 64, 64)
    for mode in ('dense', 'sparse'):
        model.set_inference_mode(mode)
        timer = PartTimer(*sar_parts(model))
        with torch.no_grad(), timer:
            for _ in range(2):
                timer.run(lambda: model(x))
        parts = timer.per_call()
        assert {'stem', 's1.base', 's1.select', 's1.refine', 's1.fusion', 's3.exit', 'layer4',
                'other', 'total'} <= set(parts)
        assert all(v >= 0 for k, v in parts.items() if k != 'other')
        assert parts['s1.refine'] > 0
        grouped = group_parts(parts)
        assert {'base', 'refine', 'select', 'fusion', 'entry', 'exit'} <= set(grouped)
    # hooks are removed afterwards
    assert not any(m._forward_hooks for m in model.modules())


def test_benchmark_tool_writes_documented_fields(tmp_path):
    out = tmp_path / 'latency_test.json'
    report = benchmark_latency.main([
        '--depths', '18', '--sizes', '64x64', '--threads', '1', '--rates', '0', '0.5', '1.0',
        '--reps', '2', '--warmup', '1', '--per-stage', '--per-stage-reps', '1',
        '--per-stage-rates', '0.5', '--profile', '--out', str(out)])
    saved = json.loads(out.read_text())
    assert set(saved) >= {'meta', 'results', 'per_stage', 'profiles', 'checks', 'targets',
                          'headroom'}
    assert {'cpu_model', 'torch', 'logical_cpus', 'command', 'config',
            'code'} <= set(saved['meta'])
    assert saved['meta']['code'].startswith(sar_backbones.__version__)
    rows = saved['results']
    names = {r['model'] for r in rows}
    assert names == {'resnet18', 'resnet18+fold', 'sar18-dense@0.00', 'sar18-sparse@0.00',
                     'sar18-dense@0.50', 'sar18-sparse@0.50', 'sar18-dense@1.00',
                     'sar18-sparse@1.00'}
    for row in rows:
        assert ROW_FIELDS <= set(row), sorted(ROW_FIELDS - set(row))
    sparse = next(r for r in rows if r['model'] == 'sar18-sparse@0.50')
    assert 'speedup_vs_dense' in sparse and 0 < sparse['flops_ratio'] < 1
    # rate 0 refines nothing: the static FLOPs alone
    floor = next(r for r in rows if r['model'] == 'sar18-sparse@0.00')
    assert floor['activation_rate'] == 0 and floor['flops'] < sparse['flops']
    assert next(r for r in rows if r['model'] == 'resnet18+fold')['ratio_vs_resnet'] == 1.0
    assert saved['checks'][0]['max_rel_error'] < 1e-4
    assert {e['case'] for e in saved['per_stage']} == {'resnet18+fold', 'sar18-dense@0.50',
                                                       'sar18-sparse@0.50'}
    for entry in saved['per_stage']:
        assert {'parts', 'grouped', 'parts_min', 'grouped_min', 'macs',
                'grouped_macs'} <= set(entry)
    # the per-part MACs add up to the paper-convention count at the nominal rate; the
    # rows count the rates the override really drew (a 2x2 grid knows only 0.25 steps)
    # (sizes other than 224x224 use fixed 4/4/7-pixel patches)
    sparse_parts = next(e for e in saved['per_stage'] if e['case'] == 'sar18-sparse@0.50')
    model = build_preset_backbone('sar-resnet18-g2s2a2b1', patch_size=(4, 4, 7))
    nominal = model_complexity(model, (3, 64, 64), 0.5)
    assert sparse_parts['macs']['total'] == pytest.approx(nominal['flops'])
    assert sparse['flops'] == pytest.approx(nominal['flops'], rel=0.05)
    assert any(t['kind'] == 'monotone' for t in saved['targets'])
    assert saved['profiles'][0]['ops']
    markdown = (tmp_path / 'latency_test.md').read_text()
    assert 'latency ratio' in markdown and 'FLOPs ratio' in markdown and 'per stage' in markdown
    assert report['results'] == rows
    assert 'Summary (rate 0.5)' in markdown
    # --render re-writes the markdown from the JSON alone
    (tmp_path / 'latency_test.md').unlink()
    benchmark_latency.main(['--render', str(out)])
    assert (tmp_path / 'latency_test.md').read_text() == markdown


def _timing_row(mode, rate, threads, median_ms, flops, resnet_ms, resnet_macs):
    return dict(depth=50, size='224x224', threads=threads, mode=mode, rate=rate,
                median_ms=median_ms, ratio_vs_resnet=median_ms / resnet_ms, flops=flops,
                flops_ratio=flops / resnet_macs)


def test_target_headroom_from_the_rate0_floor():
    resnet_macs = 4.0e9
    rows = []
    # 1 thread: ResNet 100 ms (40 GMAC/s), floor 70 ms, rate 0.5 90 ms for 0.8 GMACs more
    # 2 threads: ResNet 30 ms, floor 25 ms: above the 0.80 limit (24 ms)
    for threads, resnet_ms, floor_ms, sparse_ms, dense_ms in ((1, 100., 70., 90., 99.),
                                                              (2, 30., 25., 28., 29.)):
        for mode, rate, ms, flops in (('sparse', 0.0, floor_ms, 1.6e9),
                                      ('sparse', 0.5, sparse_ms, 2.4e9),
                                      ('dense', 0.5, dense_ms, 2.4e9)):
            rows.append(_timing_row(mode, rate, threads, ms, flops, resnet_ms, resnet_macs))
    entries = {(e['target'], e['threads']): e for e in target_headroom(dict(results=rows))}

    one = entries[('224x224, 1 thread: sparse SAR-R50 @0.5 / ResNet-50', 1)]
    assert one['limit_ms'] == pytest.approx(80.0)
    assert one['budget_ms'] == pytest.approx(10.0) and one['spent_ms'] == pytest.approx(20.0)
    assert one['patch_mmacs'] == pytest.approx(800.0)
    assert one['resnet_gmacs'] == pytest.approx(40.0)
    assert one['needed_gmacs'] == pytest.approx(80.0) and one['spent_gmacs'] == pytest.approx(40.0)
    assert one['needed_vs_resnet'] == pytest.approx(2.0)
    speedup = entries[('224x224: sparse speed-up over dense-masked @0.5', 1)]
    assert speedup['limit_ms'] == pytest.approx(99.0 / 1.2)
    assert speedup['needed_gmacs'] == pytest.approx(800.0 / (99.0 / 1.2 - 70.0))  # MMACs/ms

    two = entries[('224x224, all threads: sparse SAR-R50 @0.5 / ResNet-50', 2)]
    assert two['floor_ratio'] == pytest.approx(25 / 30)
    assert two['budget_ms'] == pytest.approx(-1.0)
    assert two['needed_gmacs'] is None and two['needed_vs_resnet'] is None
    table = format_headroom(list(entries.values()))
    assert 'floor above the limit' in table and '2.00x' in table
    # without the floor row there is nothing to say
    assert target_headroom(dict(results=[r for r in rows if r['rate'] != 0.0])) == []


def test_benchmark_tool_learned_masks_from_a_checkpoint(tmp_path, tiny_imagenet):
    backbone = build_preset_backbone('sar-resnet18-g2s2a2b1')
    ckpt = tmp_path / 'backbone.pth'
    torch.save({'state_dict': backbone.state_dict()}, ckpt)
    out = tmp_path / 'learned.json'
    report = benchmark_latency.main([
        '--depths', '18', '--sizes', '64x64', '--threads', '1', '--rates', '0.5',
        '--modes', 'sparse', '--reps', '1', '--warmup', '0', '--bn-fold', 'neither',
        '--preset', 'sar-resnet18-g2s2a2b1', '--checkpoint', str(ckpt),
        '--images', str(tiny_imagenet / 'val'), '--patch-mode', 'grid',
        '--patch-grid', '4', '4', '2',
        '--conv-backend', 'onednn', '--out', str(out)])
    assert report['meta']['config']['conv_backend'] == 'onednn'
    assert 'oneDNN for every conv' in (tmp_path / 'learned.md').read_text()
    # --patch-grid reaches the random-mask models: rate 0.5 is exact on 4x4/4x4/2x2 grids
    assert list(report['meta']['config']['patch_grid']) == [4, 4, 2]
    random_row = next(r for r in report['results'] if r['model'] == 'sar18-sparse@0.50')
    backbone = build_preset_backbone('sar-resnet18-g2s2a2b1', patch_grid=(4, 4, 2))
    expected = model_complexity(backbone, (3, 64, 64), 0.5)
    assert random_row['flops'] == pytest.approx(expected['flops'])
    learned = next(r for r in report['results'] if r['rate'] == 'learned')
    assert learned['model'] == 'sar18-sparse@learned'
    assert learned['activation_rate'] == pytest.approx(1.0)  # untrained: everything selected
    assert len(learned['stage_rates']) == 3
    assert report['meta']['config']['bn_fold'] == 'neither'
    assert next(r for r in report['results'] if r['model'] == 'resnet18')['ratio_vs_resnet'] == 1.0


def _conv_kernels(fn) -> set:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()} & {'aten::_slow_conv2d_forward',
                                                   'aten::mkldnn_convolution'}


def test_conv_backend_onednn_routes_every_conv_and_keeps_the_function():
    x = torch.randn(1, 3, 64, 64)
    resnet = fold_batchnorm(torchvision_resnet(18)).eval()
    sar = fold_batchnorm(build_preset_backbone('sar-resnet18-g2s2a2b1'))
    sar.set_mask_override(0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # where PyTorch itself picks THNN for batch-1 1x1 convs
    try:
        with torch.inference_mode():
            for model in (resnet, sar):
                default_out = model(x)
                assert _conv_kernels(lambda: model(x)) == {
                    'aten::_slow_conv2d_forward', 'aten::mkldnn_convolution'}
                default_conv2d = torch.nn.functional.conv2d
                with conv_backend('onednn'):
                    assert _conv_kernels(lambda: model(x)) == {'aten::mkldnn_convolution'}
                    assert max_relative_error(model(x), default_out) < 1e-4
                assert torch.nn.functional.conv2d is default_conv2d
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match='conv backend'):
        with conv_backend('cudnn'):
            pass
