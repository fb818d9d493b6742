"""tools/train.py, tools/dist_train.sh and tools/dist_test.sh (-> test.py) as a user runs them."""
import os
import pickle
import re
import socket
import subprocess
import sys

from .sar_tool_helpers import CONFIGS, REPO, write_tiny_cls_config

SHIPPED = CONFIGS / 'sar_resnet' / 'sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return str(sock.getsockname()[1])


def _run(args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', PORT=_free_port(),
               PYTHONWARNINGS='ignore')
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def _last_line(output, start):
    lines = [line for line in output.splitlines() if start in line]
    assert lines, f'no line with {start!r}'
    return lines[-1]


def _value(line, key):
    return float(re.search(rf'(?:^|\s){re.escape(key)}: (\S+)', line).group(1))


def test_train_resume_distributed_and_test(imagenet_data, tmp_path):
    config = write_tiny_cls_config(SHIPPED, imagenet_data, tmp_path / 'tiny_cls.py')
    work_dir = tmp_path / 'work'

    # 1 epoch on one process: 10 images / batch 4 -> 3 iterations.
    out = _run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir),
                '--cfg-options', 'train_cfg.max_epochs=1'])
    assert (work_dir / 'epoch_1.pth').is_file()
    train = _last_line(out, 'Epoch(train) [1][3/3]')
    for key in ('tau', 'target_rate', 'loss_act_rate', 'act_rate', 'act_rate_stage1'):
        assert re.search(rf'\s{key}: ', train), key
    # Iteration 2 of 3 (progress 0.67): tau = 0.01 ** (2/3), all three target steps done.
    assert _value(train, 'tau') == round(0.01**(2 / 3), 4)
    assert _value(train, 'target_rate') == 0.5
    first = _last_line(out, 'Epoch(train) [1][2/3]')
    # Iteration 1 of 3 (progress 0.33): one step, t + 2(1 - t)/3.
    assert _value(first, 'target_rate') == round(0.5 + 2 * 0.5 / 3, 4)
    val = _last_line(out, 'Epoch(val) [1][')
    for key in ('accuracy/top1', 'act_rate', 'effective_gflops'):
        assert re.search(rf'\s{re.escape(key)}: ', val), key
    assert 0 <= _value(val, 'act_rate') <= 1 and _value(val, 'effective_gflops') > 0

    # Resume on two CPU processes (torchrun, gloo, DDP): 10 images / (2 x 4) -> 2
    # iterations per epoch, so training continues from iteration 3 of 4.
    out = _run(['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir', str(work_dir),
                '--resume', '--cfg-options', 'train_cfg.max_epochs=2'])
    assert 'Distributed training: True' in out and "backend='gloo'" in out
    assert re.search(r'resumed epoch: 1, iter: 3', out), out[-3000:]
    assert (work_dir / 'epoch_2.pth').is_file()
    # Stateless schedules: the first resumed iteration has index 3 of 4 (the
    # epoch counts from the checkpoint's iteration), the next one is clipped
    # to the end of the schedule.
    train = _last_line(out, 'Epoch(train) [2][1/2]')
    assert _value(train, 'tau') == round(0.01**(3 / 4), 4)
    assert _value(train, 'target_rate') == 0.5
    assert _value(_last_line(out, 'Epoch(train) [2][2/2]'), 'tau') == 0.01

    # Distributed test through tools/test.py, dumping the predictions.
    preds = tmp_path / 'preds.pkl'
    out = _run(['bash', 'tools/dist_test.sh', str(config), str(work_dir / 'epoch_2.pth'), '2',
                '--work-dir', str(tmp_path / 'test'), '--out', str(preds)])
    test = _last_line(out, 'Epoch(test) [')
    for key in ('accuracy/top1', 'act_rate', 'act_rate_stage3', 'effective_gflops'):
        assert re.search(rf'\s{re.escape(key)}: ', test), key
    assert 0 <= _value(test, 'act_rate') <= 1
    with open(preds, 'rb') as f:
        assert len(pickle.load(f)) == 5
