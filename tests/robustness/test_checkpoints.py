"""Checkpoint loading: safe unpickling, weights of another architecture, unreadable files.

A real checkpoint of mmengine's ``Runner`` (the demo classification config,
narrowed, trained for four iterations) is the reference for what a checkpoint
of this project holds. Every loading path is exercised: ``load_checkpoint_file``,
mmengine's ``load_checkpoint`` (what ``tools/test.py`` and ``load_from`` run),
``resume``, ``init_cfg=dict(type='Pretrained')``, the converter and the
analysis tools; the command-line tools run as a user runs them (subprocess).
"""
import copy
import os
import pickle
import subprocess
import sys
import uuid

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import ExponentialMovingAverage
from mmengine.registry import init_default_scope
from mmengine.runner import Runner, load_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint
from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict

import sar_backbones  # noqa: F401  (registries, safe checkpoint loading)
from sar_backbones.compat import apply_patches, mmengine_checkpoint_safe_globals
from sar_backbones.models import SARResNet
from sar_backbones.models.backbones.checkpoint import (EXTRA_STATE_KEY,
                                                       BackboneCheckpointMismatchError,
                                                       CheckpointReadError, UnsafeCheckpointError,
                                                       check_backbone_state_dict,
                                                       decode_architecture, describe_mismatch,
                                                       extract_state_dict, load_checkpoint_file)
from sar_backbones.registry import MODELS
from tools.analysis.model_builders import load_weights
from tools.datasets.generate_shape_datasets import generate_imagenet
from ..script_loading import REPO, load_script
from .helpers import NARROW

DEMO_CLS = REPO / 'configs' / 'demo' / 'sar-resnet18-g1s2a2b1-t0.5_demo-shapes-64px.py'
# The demo classifier, narrowed (stage widths 16..128), two epochs of two iterations.
CONFIG = """_base_ = {base!r}
data_root = {data_root!r}
model = dict(backbone=dict(stem_channels=16, base_channels=16), head=dict(in_channels=128))
train_dataloader = dict(batch_size=5, dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=5, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=3))
log_level = 'WARNING'
"""
BACKBONE = dict(NARROW, mask_groups=1, patch_grid=(4, 4, 2))


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A config, and the runner checkpoints it wrote after epochs 1 and 2."""
    root = tmp_path_factory.mktemp('ckpt_run')
    generate_imagenet(root, num_train_per_class=2, num_val_per_class=1, image_size=64)
    config = root / 'cls.py'
    config.write_text(CONFIG.format(base=str(DEMO_CLS), data_root=str(root / 'imagenet')))
    cfg = _cfg(config, root / 'work')
    Runner.from_cfg(cfg).train()
    return dict(config=config, root=root, epoch1=root / 'work' / 'epoch_1.pth',
                epoch2=root / 'work' / 'epoch_2.pth')


def _cfg(config, work_dir, **options):
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    # Runners built in the same second would otherwise share a message hub.
    cfg.experiment_name = f'ckpt_{uuid.uuid4().hex}'
    cfg.merge_from_dict(options)
    return cfg


def _classifier(config, **backbone):
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.update(backbone)
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    return MODELS.build(cfg.model)


def _save_runner_style(model, path, prefix=''):
    """What mmengine's Runner saves (``meta`` + ``state_dict``), optionally under a DDP prefix."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save(dict(meta=dict(epoch=1, iter=2), state_dict=state), path)
    return path


def _assert_state_equal(actual, expected):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _run_tool(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, *fragments):
    """Exit status 2, exactly one line on stderr naming ``fragments`` (the file, ...)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    assert 'error: ' in lines[0] and 'Traceback' not in proc.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------
# safe loading of real runner checkpoints
# --------------------------------------------------------------------------


def _allowed_names():
    names = set()
    for entry in mmengine_checkpoint_safe_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f'{entry.__module__}.{entry.__qualname__}')
    return names


def test_runner_checkpoint_needs_exactly_the_allowed_globals(trained):
    for path in (trained['epoch1'], trained['epoch2']):
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        # What PyTorch alone refuses: the message hub's HistoryBuffer and numpy state.
        assert 'mmengine.logging.history_buffer.HistoryBuffer' in needed
        assert any(name.startswith('numpy.') for name in needed)
        assert needed <= _allowed_names(), needed - _allowed_names()
        with torch.serialization.safe_globals(mmengine_checkpoint_safe_globals()):
            assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    # The allowance is scoped to our loader: PyTorch's own default is unchanged.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(trained['epoch2'])
    checkpoint = load_checkpoint_file(trained['epoch2'])
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'} <= set(checkpoint)
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    # Every state dict carries the backbone's architecture record.
    record = decode_architecture(checkpoint['state_dict']['backbone.' + EXTRA_STATE_KEY])
    assert record == SARResNet(**BACKBONE).architecture()
    assert record['mask_groups'] == 1 and record['base_strides'] == (2, 2, 2)


def test_patched_mmengine_loader_is_the_safe_one_and_idempotent(trained):
    loader = CheckpointLoader._schemes['']
    apply_patches()
    assert CheckpointLoader._schemes[''] is loader
    checkpoint = _load_checkpoint(str(trained['epoch2']), map_location='cpu')
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    # mmengine's own loader (without the fix) refuses the same file.
    with pytest.raises(pickle.UnpicklingError):
        loader.__wrapped__(str(trained['epoch2']), 'cpu')


class _RecordStart(Hook):

    def before_train(self, runner):
        self.iter = runner.iter
        self.state = copy.deepcopy(runner.model.state_dict())


def test_runner_resumes_from_its_checkpoint(trained, tmp_path):
    work = tmp_path / 'resume'
    work.mkdir()
    record = _RecordStart()
    cfg = _cfg(trained['config'], work, resume=True, load_from=str(trained['epoch1']))
    runner = Runner.from_cfg(cfg)
    runner.register_hook(record)
    runner.train()
    assert record.iter == 2 and runner.iter == 4 and runner.epoch == 2
    _assert_state_equal(record.state, load_checkpoint_file(trained['epoch1'])['state_dict'])


def test_load_from_and_pretrained_load_runner_checkpoint(trained, tmp_path):
    expected = load_checkpoint_file(trained['epoch2'])['state_dict']
    runner = Runner.from_cfg(_cfg(trained['config'], tmp_path, load_from=str(trained['epoch2'])))
    runner.load_or_resume()
    _assert_state_equal(runner.model.state_dict(), expected)
    # init_cfg=Pretrained with the classifier checkpoint and prefix='backbone.'.
    backbone = SARResNet(**BACKBONE, init_cfg=dict(type='Pretrained', prefix='backbone.',
                                                   checkpoint=str(trained['epoch2'])))
    backbone.init_weights()
    _assert_state_equal(backbone.state_dict(), extract_state_dict(expected, 'backbone.'))


# --------------------------------------------------------------------------
# malicious checkpoints
# --------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").close()', )


class _GetattrWalk:
    """``getattr(HistoryBuffer.__init__, '__globals__')``: a walk towards arbitrary code
    through globals that are allowed (``getattr`` is needed for HistoryBuffer's methods)."""

    def __reduce__(self):
        return getattr, (HistoryBuffer.__init__, '__globals__')


def _malicious(tmp_path, where):
    marker = tmp_path / f'{where}.ran'
    state = SARResNet(**BACKBONE).state_dict()
    checkpoint = dict(meta=dict(epoch=1), state_dict=dict(state))
    legacy = where == 'legacy'
    if where == 'getattr':
        checkpoint['message_hub'] = dict(runtime_info=dict(x=_GetattrWalk()))
        path = tmp_path / 'getattr.pth'
        torch.save(checkpoint, path)
        return path, marker
    if where in ('weights', 'legacy'):
        checkpoint['state_dict']['conv1.weight'] = _Payload(marker)
    elif where == 'meta':
        checkpoint['meta']['cfg'] = _Payload(marker)
    else:  # nested in what a message hub holds
        checkpoint['message_hub'] = dict(log_scalars={'train/loss': [_Payload(marker)]})
    path = tmp_path / f'{where}.pth'
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    # The payload works: an unsafe load would run it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def _converter():
    return load_script('tools/model_converters/sar2backbone.py')


LOADERS = {
    'load_checkpoint_file': lambda path, tmp: load_checkpoint_file(path),
    'mmengine_load_checkpoint': lambda path, tmp: load_checkpoint(SARResNet(**BACKBONE), str(path)),
    'pretrained': lambda path, tmp: SARResNet(
        **BACKBONE, init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights(),
    'converter': lambda path, tmp: _converter().convert(str(path), str(tmp / 'out.pth')),
    'analysis_tools': lambda path, tmp: load_weights(SARResNet(**BACKBONE), str(path)),
}


@pytest.mark.parametrize('where', ['weights', 'meta', 'message_hub', 'legacy', 'getattr'])
@pytest.mark.parametrize('loader', list(LOADERS))
def test_malicious_checkpoint_is_refused_naming_the_file(tmp_path, where, loader):
    path, marker = _malicious(tmp_path, where)
    with pytest.raises(UnsafeCheckpointError) as info:
        LOADERS[loader](path, tmp_path)
    message = str(info.value)
    assert str(path) in message and ('getattr' if where == 'getattr' else 'exec') in message
    assert 'weights_only=False' in message and 'trust' in message and '\n' not in message
    assert not marker.exists()
    assert not (tmp_path / 'out.pth').exists()


def test_malicious_checkpoint_is_refused_by_resume(trained, tmp_path):
    path, marker = _malicious(tmp_path, 'message_hub')
    cfg = _cfg(trained['config'], tmp_path / 'work', resume=True, load_from=str(path))
    with pytest.raises(UnsafeCheckpointError, match='weights_only=False'):
        Runner.from_cfg(cfg).train()
    assert not marker.exists()


# --------------------------------------------------------------------------
# weights of another architecture
# --------------------------------------------------------------------------

# (checkpoint's backbone options, model's options, what the message must name)
MISMATCHES = {
    'depth': (dict(depth=34), dict(), 'depth: checkpoint 34 vs model 18'),
    'mask_groups': (dict(mask_groups=2), dict(), 'mask_groups: checkpoint 2 vs model 1'),
    'base_stride': (dict(base_stride=4), dict(),
                    'base_strides: checkpoint (4, 4, 2) vs model (2, 2, 2)'),
    'base_stride_per_stage': (dict(base_stride=(2, 4, 2)), dict(),
                              'base_strides: checkpoint (2, 4, 2) vs model (2, 2, 2)'),
    'alpha': (dict(alpha=1), dict(), 'alpha: checkpoint 1 vs model 2'),
    'beta': (dict(), dict(beta=2), 'beta: checkpoint 1 vs model 2'),
    'deep_stem': (dict(deep_stem=True), dict(), 'deep_stem: checkpoint True vs model False'),
    'stem_channels': (dict(stem_channels=32), dict(), 'stem_channels: checkpoint 32 vs model 16'),
    'base_channels': (dict(base_channels=32), dict(), 'base_channels: checkpoint 32 vs model 16'),
    'in_channels': (dict(in_channels=1), dict(), 'in_channels: checkpoint 1 vs model 3'),
}


def _load_backbone_directly(ckpt_model, model, tmp_path):
    model.load_state_dict(ckpt_model.state_dict(), strict=False)


def _load_with_mmengine(ckpt_model, model, tmp_path):
    # tools/test.py, load_from and resume: mmengine's load_checkpoint, strict=False.
    path = _save_runner_style(ckpt_model, tmp_path / 'model.pth', prefix='module.')
    load_checkpoint(model, str(path), map_location='cpu')


def _load_pretrained(ckpt_model, model, tmp_path):
    path = _save_runner_style(ckpt_model, tmp_path / 'model.pth')
    model.init_cfg = dict(type='Pretrained', checkpoint=str(path))
    model.init_weights()


PATHS = {'load_state_dict': _load_backbone_directly, 'mmengine': _load_with_mmengine,
         'pretrained': _load_pretrained}


@pytest.mark.parametrize('path', list(PATHS))
@pytest.mark.parametrize('case', list(MISMATCHES))
def test_checkpoint_of_another_architecture_is_refused(tmp_path, case, path):
    ckpt_options, model_options, named = MISMATCHES[case]
    torch.manual_seed(1)
    ckpt_model = SARResNet(**{**BACKBONE, **ckpt_options})
    torch.manual_seed(2)
    model = SARResNet(**{**BACKBONE, **model_options})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BackboneCheckpointMismatchError) as info:
        PATHS[path](ckpt_model, model, tmp_path)
    message = str(info.value)
    assert named in message and 'architecture differs' in message and '\n' not in message
    if path == 'pretrained':
        assert str(tmp_path / 'model.pth') in message
    # Nothing was loaded.
    _assert_state_equal(model.state_dict(), before)


def test_base_stride_weights_have_identical_shapes():
    """The case that only the architecture record can catch."""
    s2, s4 = (SARResNet(**BACKBONE, base_stride=s).state_dict() for s in (2, 4))
    assert {k: v.shape for k, v in s2.items() if k != EXTRA_STATE_KEY} == \
        {k: v.shape for k, v in s4.items() if k != EXTRA_STATE_KEY}


def test_whole_model_checkpoint_of_another_backbone_is_refused_by_load_from(trained, tmp_path):
    other = _classifier(trained['config'], stem_channels=16, base_channels=16, base_stride=4)
    path = _save_runner_style(other, tmp_path / 's4.pth')
    runner = Runner.from_cfg(_cfg(trained['config'], tmp_path / 'work', load_from=str(path)))
    with pytest.raises(BackboneCheckpointMismatchError, match=r'base_strides: checkpoint \(4'):
        runner.load_or_resume()


@pytest.mark.parametrize('options', [
    dict(patch_grid=None, patch_size=(4, 4, 7)),
    dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True),
    dict(target_rate=0.3, temperature=0.5, inference_mode='dense', out_indices=(3, )),
    dict(norm_cfg=dict(type='SyncBN', requires_grad=True), frozen_stages=1, norm_eval=True),
])
def test_how_the_network_is_applied_may_differ(tmp_path, options):
    """ImageNet weights go to detection (patch sizes) and segmentation (dilations)."""
    torch.manual_seed(1)
    source = SARResNet(**BACKBONE)
    model = SARResNet(**{**BACKBONE, **options})
    path = _save_runner_style(source, tmp_path / 'src.pth', prefix='backbone.')
    model.init_cfg = dict(type='Pretrained', checkpoint=str(path), prefix='backbone.')
    model.init_weights()
    _assert_state_equal(model.state_dict(), source.state_dict())
    load_checkpoint(model, str(_save_runner_style(source, tmp_path / 'plain.pth')))


def test_checkpoints_without_record_load_and_are_checked_by_shape(tmp_path):
    """Checkpoints written before the record existed: keys and shapes only."""
    source = SARResNet(**BACKBONE)
    old = {k: v for k, v in source.state_dict().items() if k != EXTRA_STATE_KEY}
    model = SARResNet(**BACKBONE)
    assert describe_mismatch(model, old) == ''
    assert model.load_state_dict(old, strict=True).missing_keys == []
    mmengine_load_state_dict(model, old, strict=True)  # raises on any missing key
    _assert_state_equal({k: v for k, v in model.state_dict().items() if k in old}, old)
    # Shapes still catch another depth; base stride 4 cannot be told apart then.
    with pytest.raises(BackboneCheckpointMismatchError, match='missing in checkpoint'):
        SARResNet(**{**BACKBONE, 'depth': 34}).load_state_dict(old, strict=False)
    SARResNet(**BACKBONE, base_stride=4).load_state_dict(old)


def test_describe_mismatch_does_not_list_the_record():
    model = SARResNet(**BACKBONE)
    state = model.state_dict()
    assert EXTRA_STATE_KEY in state
    assert describe_mismatch(model, state) == ''
    message = describe_mismatch(SARResNet(**{**BACKBONE, 'depth': 34}), state)
    assert 'missing in checkpoint' in message and EXTRA_STATE_KEY not in message


def test_unreadable_record_is_an_error():
    model = SARResNet(**BACKBONE)
    state = model.state_dict()
    state[EXTRA_STATE_KEY] = torch.tensor([1.0, 2.0])
    with pytest.raises(BackboneCheckpointMismatchError, match='unreadable architecture record'):
        model.load_state_dict(state)


def test_ddp_prefix_ema_and_partial_loads(tmp_path):
    model = SARResNet(**BACKBONE)
    # A DDP prefix is removed by mmengine and by extract_state_dict.
    path = _save_runner_style(model, tmp_path / 'ddp.pth', prefix='module.')
    other = SARResNet(**BACKBONE)
    load_checkpoint(other, str(path))
    _assert_state_equal(other.state_dict(), model.state_dict())
    assert list(extract_state_dict(load_checkpoint_file(path))) == list(model.state_dict())
    # EMA copies every state-dict entry, the record (a uint8 tensor) included.
    ema = ExponentialMovingAverage(model, update_buffers=True)
    ema.update_parameters(model)
    ema.update_parameters(model)
    assert EXTRA_STATE_KEY in ema.module.state_dict()
    # A state dict with no key of the backbone (e.g. a head alone) is not its business.
    model.load_state_dict({}, strict=False)


# --------------------------------------------------------------------------
# unreadable files
# --------------------------------------------------------------------------


def _unreadable(tmp_path, kind, trained=None):
    path = tmp_path / f'{kind}.pth'
    if kind == 'text':
        path.write_text('not a checkpoint\n')
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'tensor':
        torch.save(torch.ones(3), path)
    elif kind == 'list':
        torch.save([torch.ones(3)], path)
    elif kind == 'truncated':
        buffer = __import__('io').BytesIO()
        torch.save(SARResNet(**BACKBONE).state_dict(), buffer)
        path.write_bytes(buffer.getvalue()[:buffer.tell() // 2])
    elif kind == 'not_tensors':
        torch.save(dict(state_dict=dict(lr=0.1, name='x')), path)
    elif kind == 'empty_dict':
        torch.save(dict(), path)
    elif kind == 'directory':
        path.mkdir()
    elif kind != 'missing':
        raise ValueError(kind)
    return path


KINDS = ['text', 'empty', 'tensor', 'list', 'truncated', 'not_tensors', 'empty_dict',
         'directory', 'missing']


@pytest.mark.parametrize('kind', KINDS)
def test_unreadable_file_gives_a_clear_error_from_the_library(tmp_path, kind):
    path = _unreadable(tmp_path, kind)
    for load in (lambda: extract_state_dict(load_checkpoint_file(path), source=str(path)),
                 lambda: load_checkpoint(SARResNet(**BACKBONE), str(path)),
                 lambda: SARResNet(**BACKBONE, init_cfg=dict(type='Pretrained',
                                                             checkpoint=str(path))).init_weights()):
        with pytest.raises(CheckpointReadError) as info:
            load()
        message = str(info.value)
        assert str(path) in message and '\n' not in message, message


def test_nothing_under_the_prefix_is_an_error(tmp_path):
    path = _save_runner_style(SARResNet(**BACKBONE), tmp_path / 'bare.pth')
    with pytest.raises(CheckpointReadError, match=r"no weights under prefix 'backbone\.'"):
        SARResNet(**BACKBONE, init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            prefix='backbone.')).init_weights()


TOOL_CASES = {
    # tool: (script, kind of bad file); every kind is checked on the library above
    'test': ('tools/test.py', 'text'),
    'train_resume': ('tools/train.py', 'empty'),
    'sar2backbone': ('tools/model_converters/sar2backbone.py', 'truncated'),
    'get_flops': ('tools/analysis/get_flops.py', 'tensor'),
    'visualize_masks': ('tools/analysis/visualize_masks.py', 'list'),
    'benchmark_latency': ('tools/analysis/benchmark_latency.py', 'not_tensors'),
}


def _tool_args(tool, bad, trained, tmp_path):
    if tool.startswith('test'):
        return ['tools/test.py', trained['config'], bad, '--work-dir', tmp_path / 'work']
    if tool == 'train_resume':
        return ['tools/train.py', trained['config'], '--work-dir', tmp_path / 'work', '--resume',
                bad]
    if tool == 'sar2backbone':
        return ['tools/model_converters/sar2backbone.py', bad, tmp_path / 'out.pth']
    preset = ['--preset', 'sar-resnet18-g1s2a2b1', '--checkpoint', bad]
    if tool == 'get_flops':
        return ['tools/analysis/get_flops.py', *preset, '--no-reference', '--shape', '64']
    if tool == 'visualize_masks':
        return ['tools/analysis/visualize_masks.py', *preset, '--images',
                trained['root'] / 'imagenet' / 'val', '--num-images', 1, '--no-figure',
                '--out-dir', tmp_path / 'vis']
    return ['tools/analysis/benchmark_latency.py', *preset, '--depths', 18, '--sizes', 64,
            '--threads', 1, '--reps', 1, '--warmup', 0, '--out', tmp_path / 'lat.json']


@pytest.mark.parametrize('tool', list(TOOL_CASES))
def test_tools_report_an_unreadable_checkpoint_in_one_line(trained, tmp_path, tool):
    bad = _unreadable(tmp_path, TOOL_CASES[tool][1])
    proc = _run_tool(_tool_args(tool, bad, trained, tmp_path))
    _assert_one_line_error(proc, bad)
    assert not (tmp_path / 'out.pth').exists() and not (tmp_path / 'lat.json').exists()


# --------------------------------------------------------------------------
# tools/test.py with a checkpoint that does not fit
# --------------------------------------------------------------------------


def test_test_tool_refuses_checkpoint_of_another_architecture(trained, tmp_path):
    # base stride 4 vs the config's 2: every shape agrees, only the record differs.
    other = _classifier(trained['config'], stem_channels=16, base_channels=16, base_stride=4)
    path = _save_runner_style(other, tmp_path / 's4.pth')
    proc = _run_tool(['tools/test.py', trained['config'], path, '--work-dir', tmp_path / 'w'])
    _assert_one_line_error(proc, path, 'base_strides: checkpoint (4, 4, 2) vs model (2, 2, 2)')
    assert 'Epoch(test)' not in proc.stdout + proc.stderr  # no metric published


def test_test_tool_refuses_backbone_only_checkpoint_and_accepts_its_own(trained, tmp_path):
    backbone_only = tmp_path / 'backbone.pth'
    _converter().convert(str(trained['epoch2']), str(backbone_only))
    proc = _run_tool(['tools/test.py', trained['config'], backbone_only,
                      '--work-dir', tmp_path / 'w'])
    _assert_one_line_error(proc, backbone_only, 'backbone weights only')
    proc = _run_tool(['tools/test.py', trained['config'], trained['epoch2'],
                      '--work-dir', tmp_path / 'w', '--cfg-options', 'log_level=INFO'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'accuracy/top1' in proc.stdout + proc.stderr


def test_test_tool_check_lists_missing_head_weights(trained, tmp_path):
    test_tool = load_script('tools/test.py')
    model = _classifier(trained['config'], stem_channels=16, base_channels=16)
    checkpoint = load_checkpoint_file(trained['epoch2'])
    test_tool.check_checkpoint_fits(model, checkpoint, 'ck.pth')  # fits
    del checkpoint['state_dict']['head.fc.weight']
    with pytest.raises(test_tool.CheckpointMismatchError, match=r'ck\.pth .*head\.fc\.weight'):
        test_tool.check_checkpoint_fits(model, checkpoint, 'ck.pth')


# --------------------------------------------------------------------------
# the converter
# --------------------------------------------------------------------------


def test_converter_output_is_safe_and_records_the_architecture(trained, tmp_path):
    dst = tmp_path / 'backbone.pth'
    _converter().main([str(trained['epoch2']), str(dst)])
    converted = torch.load(dst, map_location='cpu', weights_only=True)
    expected = SARResNet(**BACKBONE).architecture()
    assert decode_architecture(converted['state_dict'][EXTRA_STATE_KEY]) == expected
    assert converted['meta']['architecture'] == expected
    model = SARResNet(**BACKBONE, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model.init_weights()
    with pytest.raises(BackboneCheckpointMismatchError, match='base_strides'):
        SARResNet(**BACKBONE, base_stride=4,
                  init_cfg=dict(type='Pretrained', checkpoint=str(dst))).init_weights()


def test_converter_rebuilds_the_record_of_older_checkpoints(trained, tmp_path):
    checkpoint = load_checkpoint_file(trained['epoch2'])
    del checkpoint['state_dict']['backbone.' + EXTRA_STATE_KEY]
    old = tmp_path / 'old.pth'
    torch.save(checkpoint, old)
    dst = tmp_path / 'backbone.pth'
    state = _converter().convert(str(old), str(dst))
    record = decode_architecture(state[EXTRA_STATE_KEY])
    assert record == SARResNet(**BACKBONE).architecture()
    # Without the training config no record can be made: keys and shapes only.
    del checkpoint['meta']['cfg']
    torch.save(checkpoint, old)
    state = _converter().convert(str(old), str(dst), overwrite=True)
    assert EXTRA_STATE_KEY not in state
    check_backbone_state_dict(SARResNet(**BACKBONE, base_stride=4), state)


def _main_error(main, args, capsys):
    """Run a tool's ``main`` in-process; its usage error: exit 2 and one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    return err[0]


def test_converter_never_writes_over_its_input(trained, tmp_path, capsys):
    src = tmp_path / 'ck.pth'
    src.write_bytes(trained['epoch2'].read_bytes())
    content = src.read_bytes()
    same = tmp_path / 'sub' / '..' / 'ck.pth'
    (tmp_path / 'sub').mkdir()
    link = tmp_path / 'link.pth'
    link.symlink_to(src)
    converter = _converter()
    for dst, extra in ((src, []), (src, ['--overwrite']), (same, ['--overwrite']),
                       (link, ['--overwrite'])):
        line = _main_error(converter.main, [src, dst, *extra], capsys)
        assert 'is also the input' in line and str(dst) in line
        assert src.read_bytes() == content
    with pytest.raises(ValueError, match='never writes over its input'):
        converter.convert(str(src), str(same), overwrite=True)
    assert src.read_bytes() == content


def test_converter_overwrites_only_when_asked(trained, tmp_path, capsys):
    dst = tmp_path / 'out.pth'
    dst.write_text('keep me')
    converter = _converter()
    line = _main_error(converter.main, [trained['epoch2'], dst], capsys)
    assert str(dst) in line and '--overwrite' in line
    assert dst.read_text() == 'keep me'
    with pytest.raises(FileExistsError):
        converter.convert(str(trained['epoch2']), str(dst))
    assert dst.read_text() == 'keep me'
    converter.main([str(trained['epoch2']), str(dst), '--overwrite'])
    assert 'state_dict' in torch.load(dst, weights_only=True)
    assert oct(dst.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_converter_failure_leaves_no_partial_file(trained, tmp_path, monkeypatch):
    converter = _converter()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(converter.torch, 'save', failing_save)
    dst = tmp_path / 'out.pth'
    with pytest.raises(OSError, match='No space'):
        converter.convert(str(trained['epoch2']), str(dst))
    assert list(tmp_path.iterdir()) == []
    dst.write_text('previous')
    with pytest.raises(OSError):
        converter.convert(str(trained['epoch2']), str(dst), overwrite=True)
    assert dst.read_text() == 'previous' and list(tmp_path.iterdir()) == [dst]
