"""Every tool rejects nonsense arguments before any work: exit 2, one stderr line, no file written.

The argument errors happen while parsing, before a model is built, so the
tools are called in-process (their ``parse_args`` / ``main``); a few real
subprocess runs check the exit status and the stderr line end to end.
"""
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from ..script_loading import REPO, load_script

PRESET = 'sar-resnet18-g2s2a2b1'
CLASSIFIER = REPO / 'configs' / 'sar_resnet' / 'sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'


def _tree(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory holding one existing file (``existing.json``) and its markdown."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'existing.json').write_text('{"mine": 1}')
    (tmp_path / 'existing.md').write_text('# mine')
    (tmp_path / 'model.pth').write_bytes(b'weights')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('keep')
    (tmp_path / 'a_file').write_text('not a folder')
    (tmp_path / 'imgs').mkdir()
    (tmp_path / 'imgs' / 'one.jpg').write_bytes(b'not decoded while parsing')
    return tmp_path


def _expect_usage_error(call, argv: List[str], option: str, root: Path, capsys) -> str:
    """``call(argv)`` exits 2 with one stderr line naming ``option`` and writes nothing."""
    before = _tree(root)
    with pytest.raises(SystemExit) as exit_info:
        call(argv)
    assert exit_info.value.code == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, (argv, captured.err)
    assert option in lines[0], (argv, lines[0])
    assert 'Traceback' not in captured.err
    assert _tree(root) == before, argv
    return lines[0]


# ------------------------------------------------------------------ get_flops
FLOPS_CASES = [
    (['--shape', '0'], '--shape'), (['--shape', '-64'], '--shape'),
    (['--shape', '64', '64', '64'], '--shape'), (['--shape', 'nan'], '--shape'),
    (['--shape', '16'], '--shape'), (['--shape', '1000000'], '--shape'),
    (['--shape', '64.5'], '--shape'),
    (['--rate', 'nan'], '--rate'), (['--rate', '-0.1'], '--rate'), (['--rate', '1.5'], '--rate'),
    (['--rate', 'inf'], '--rate'), (['--rate', '0.5', 'abc'], '--rate'),
    (['--num-classes', '-1'], '--num-classes'), (['--num-classes', '0'], '--num-classes'),
    (['--num-classes', '2.5'], '--num-classes'),
    (['--images', 'imgs', '--num-images', '0'], '--num-images'),
    (['--images', 'imgs', '--num-images', '-1'], '--num-images'),
    (['--images', 'imgs', '--pad-divisor', '0'], '--pad-divisor'),
    (['--patch-size', '0', '4', '7'], '--patch-size'), (['--patch-size', '4', '4'], '--patch-size'),
    (['--num-images', '3'], '--num-images'), (['--hist', 'h.png'], '--hist'),
    (['--pad-divisor', '32'], '--pad-divisor'), (['--dataloader'], '--dataloader'),
    (['--out', 'existing.json'], '--out'),
    (['--checkpoint', 'model.pth', '--out', 'model.pth', '--overwrite'], '--out'),
    (['--out', 'full'], '--out'), (['--out', 'a_file/x.json'], '--out'),
    (['--images', 'imgs', '--out', 'r.json', '--hist', 'existing.json'], '--hist'),
    (['--images', 'imgs', '--out', 'r.json', '--hist', 'r.json'], '--hist'),
    (['--cfg-options', 'a=1'], '--cfg-options'),
    (['--checkpoint', 'missing.pth'], '--checkpoint'), (['--images', 'missing'], '--images'),
]


@pytest.fixture(scope='module')
def get_flops():
    return load_script('tools/analysis/get_flops.py')


@pytest.mark.parametrize('argv,option', FLOPS_CASES, ids=lambda v: ' '.join(v)
                         if isinstance(v, list) else None)
def test_get_flops_rejects(get_flops, workspace, capsys, argv, option):
    _expect_usage_error(get_flops.parse_args, ['--preset', PRESET, *argv], option, workspace,
                        capsys)


def test_get_flops_config_only_options(get_flops, workspace, capsys):
    _expect_usage_error(get_flops.parse_args, [str(CLASSIFIER), '--patch-size', '4', '4', '7'],
                        '--patch-size', workspace, capsys)


def test_get_flops_accepts_good_arguments(get_flops, workspace):
    args = get_flops.parse_args(['--preset', PRESET, '--shape', '64', '96', '--rate', '0', '1',
                                 '--images', 'imgs', '--num-images', '2', '--out',
                                 'existing.json', '--overwrite'])
    assert args.shape == [64, 96] and args.rate == [0.0, 1.0] and args.num_images == 2
    assert args.hist == 'existing_hist.png'  # next to --out, checked like --out


# ------------------------------------------------------------------ visualize_masks
MASK_CASES = [
    (['--num-images', '0'], '--num-images'), (['--num-images', '-1'], '--num-images'),
    (['--shape', '0'], '--shape'), (['--shape', '64', '64', '64'], '--shape'),
    (['--mask-rate', 'nan'], '--mask-rate'), (['--mask-rate', '1.5'], '--mask-rate'),
    (['--mask-rate', '-0.5'], '--mask-rate'), (['--seed', '-1'], '--seed'),
    (['--seed', '0.5'], '--seed'), (['--patch-size', '0', '1', '1'], '--patch-size'),
    (['--out-dir', 'full'], '--out-dir'), (['--out-dir', 'a_file'], '--out-dir'),
    (['--out-dir', 'a_file/below'], '--out-dir'), (['--level', 'pixel'], '--level'),
    (['--dataloader'], '--dataloader'), (['--checkpoint', 'missing.pth'], '--checkpoint'),
]


@pytest.fixture(scope='module')
def visualize_masks():
    return load_script('tools/analysis/visualize_masks.py')


@pytest.mark.parametrize('argv,option', MASK_CASES, ids=lambda v: ' '.join(v)
                         if isinstance(v, list) else None)
def test_visualize_masks_rejects(visualize_masks, workspace, capsys, argv, option):
    call = visualize_masks.parse_args
    if option == '--dataloader':
        _expect_usage_error(call, ['--preset', PRESET, *argv], 'dataloader', workspace, capsys)
        return
    _expect_usage_error(call, ['--preset', PRESET, '--images', 'imgs', *argv], option, workspace,
                        capsys)


def test_visualize_masks_writes_into_a_full_folder_only_when_asked(visualize_masks, workspace):
    args = visualize_masks.parse_args(['--preset', PRESET, '--images', 'imgs', '--out-dir',
                                       'full', '--overwrite'])
    assert args.out_dir == 'full'


def test_visualize_masks_never_writes_into_its_input_folder(visualize_masks, workspace, capsys):
    _expect_usage_error(visualize_masks.parse_args,
                        ['--preset', PRESET, '--images', 'full', '--out-dir', 'full',
                         '--overwrite'], '--out-dir', workspace, capsys)


# ------------------------------------------------------------------ benchmark_latency
LATENCY_CASES = [
    (['--depths', '19'], '--depths'), (['--sizes', '0x64'], '--sizes'),
    (['--sizes', '64x64x64'], '--sizes'), (['--sizes', 'axb'], '--sizes'),
    (['--sizes', '-64'], '--sizes'), (['--threads', '-1'], '--threads'),
    (['--rates', 'nan'], '--rates'), (['--rates', '1.5'], '--rates'),
    (['--rates', '-0.2'], '--rates'), (['--variant', 'g0s2a2b1'], '--variant'),
    (['--variant', 'foo'], '--variant'), (['--variant', 'g2s2a2b0'], '--variant'),
    (['--reps', '0'], '--reps'), (['--reps', '-3'], '--reps'), (['--warmup', '-1'], '--warmup'),
    (['--per-stage-reps', '0'], '--per-stage-reps'), (['--profile-rate', 'nan'], '--profile-rate'),
    (['--patch-grid', '0', '7', '2'], '--patch-grid'), (['--patch-size', '4', '4'], '--patch-size'),
    (['--seed', '-1'], '--seed'), (['--reps-large', '0'], '--reps-large'),
    (['--depths-large', '7'], '--depths-large'),
    (['--checkpoint', 'model.pth'], '--checkpoint'), (['--images', 'imgs'], '--images'),
    (['--per-stage-rates', '0.5'], '--per-stage-rates'),
    (['--checkpoint', 'missing.pth', '--preset', PRESET], '--checkpoint'),
    (['--checkpoint', 'model.pth', '--preset', PRESET, '--images', 'missing'], '--images'),
]


@pytest.fixture(scope='module')
def benchmark_latency():
    return load_script('tools/analysis/benchmark_latency.py')


@pytest.mark.parametrize('argv,option', LATENCY_CASES, ids=lambda v: ' '.join(v)
                         if isinstance(v, list) else None)
def test_benchmark_latency_rejects(benchmark_latency, workspace, capsys, argv, option):
    _expect_usage_error(benchmark_latency.parse_args, ['--out', 'new.json', *argv], option,
                        workspace, capsys)


@pytest.mark.parametrize('argv', [['--out', 'existing.json'], ['--out', 'report.txt'],
                                  ['--out', 'model.json', '--checkpoint', 'model.json',
                                   '--preset', PRESET, '--overwrite'],
                                  ['--render', 'missing.json'],
                                  ['--render', 'existing.json', '--out', 'x.json']])
def test_benchmark_latency_outputs(benchmark_latency, workspace, capsys, argv):
    (workspace / 'model.json').write_text('{}')
    option = '--render' if argv[0] == '--render' and 'missing' in argv[1] else '--out'
    _expect_usage_error(benchmark_latency.parse_args, argv, option, workspace, capsys)


def test_benchmark_latency_refuses_an_existing_markdown(benchmark_latency, workspace, capsys):
    (workspace / 'new.md').write_text('# an older report')
    line = _expect_usage_error(benchmark_latency.parse_args, ['--out', 'new.json'], '--out',
                               workspace, capsys)
    assert 'new.md' in line and '--overwrite' in line
    args = benchmark_latency.parse_args(['--out', 'new.json', '--overwrite', '--sizes', '64',
                                         '96x128', '--variant', 'g1s2a2b0.5'])
    assert args.sizes == [(64, 64), (96, 128)] and args.variant == (1, 2, 2, 0.5)


# ------------------------------------------------------------------ benchmark scripts
SCRIPT_CASES = [
    (['--threads', '-1'], '--threads'), (['--reps', '0'], '--reps'), (['--reps', 'nan'], '--reps'),
    (['--warmup', '-1'], '--warmup'), (['--warmup', '1.5'], '--warmup'),
]


@pytest.mark.parametrize('script', ['benchmarks/conv_kernels.py', 'benchmarks/layout_copy.py'])
def test_benchmark_scripts_reject(script, workspace, capsys):
    main = load_script(script).main
    for argv, option in SCRIPT_CASES:
        _expect_usage_error(main, ['--out', 'new.json', *argv], option, workspace, capsys)
    for argv in (['--out', 'existing.json'], ['--out', 'report.txt'], ['--out', 'full'],
                 ['--out', 'a_file/x.json']):
        _expect_usage_error(main, argv, '--out', workspace, capsys)
    _expect_usage_error(main, [], '--out', workspace, capsys)  # required


# ------------------------------------------------------------------ demo
@pytest.fixture(scope='module')
def demo():
    return load_script('tools/demo.py')


@pytest.mark.parametrize('argv,option', [
    (['--num-vis', '0'], '--num-vis'), (['--num-vis', '-1'], '--num-vis'),
    (['--num-vis', 'abc'], '--num-vis'), (['--num-vis', '1000'], '--num-vis'),
    (['--work-dir', 'a_file'], '--work-dir'), (['--work-dir', 'full'], '--work-dir'),
    (['--work-dir', 'new', '--data-root', 'a_file'], '--data-root'),
    (['--work-dir', 'new', '--data-root', 'full', '--skip-data'], '--skip-data'),
])
def test_demo_rejects(demo, workspace, capsys, argv, option):
    _expect_usage_error(demo.parse_args, argv, option, workspace, capsys)


def test_demo_refuses_foreign_data_and_reruns_only_when_asked(demo, workspace, capsys):
    (workspace / 'data').mkdir()
    (workspace / 'data' / 'dataset_info.json').write_text(json.dumps({'generator': 'other'}))
    line = _expect_usage_error(demo.parse_args, ['--work-dir', 'run', '--data-root', 'data'],
                               '--data-root', workspace, capsys)
    assert 'dataset_info.json' in line
    # A work dir holding only its own generated data is not an earlier run.
    from tools.datasets.generate_shape_datasets import generate_imagenet
    generate_imagenet(workspace / 'run' / 'data', num_train_per_class=1, num_val_per_class=1,
                      image_size=32)
    assert demo.parse_args(['--work-dir', 'run', '--quick']).work_dir == 'run'
    (workspace / 'run' / 'results.json').write_text('{}')
    _expect_usage_error(demo.parse_args, ['--work-dir', 'run', '--quick'], '--work-dir',
                        workspace, capsys)
    assert demo.parse_args(['--work-dir', 'run', '--quick', '--overwrite']).overwrite


# ------------------------------------------------------------------ train / test
def test_train_and_test_reject(workspace, capsys):
    train = load_script('tools/train.py')
    test = load_script('tools/test.py')
    _expect_usage_error(train.parse_args, ['cfg.py', '--local-rank', '-1'], '--local-rank',
                        workspace, capsys)
    for argv, option in ((['--local-rank', '-1'], '--local-rank'),
                         (['--out', 'results.txt'], '--out'),
                         (['--out', 'existing.json.pkl'], '--out'),
                         (['--out', 'model.pkl', '--overwrite'], '--out')):
        (workspace / 'existing.json.pkl').write_bytes(b'old')
        (workspace / 'model.pkl').write_bytes(b'old')
        _expect_usage_error(test.parse_args, ['cfg.py', 'model.pkl', *argv], option, workspace,
                            capsys)


# ------------------------------------------------------------------ real processes
@pytest.mark.parametrize('argv,option', [
    (['tools/analysis/get_flops.py', '--preset', PRESET, '--rate', 'nan'], '--rate'),
    (['benchmarks/conv_kernels.py', '--reps', '0', '--out', 'x.json'], '--reps'),
    (['tools/demo.py', '--num-vis', '-1'], '--num-vis'),
])
def test_real_process_exit_status_and_one_line(tmp_path, argv, option):
    script = str(REPO / argv[0])
    proc = subprocess.run([sys.executable, script, *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []
