"""The fused native refine kernel (C++, CPU float32): build, cache, load, and choose it.

``refine.cpp`` implements ``sar_native::refine_stage``, the same function as
:func:`sar_backbones.inference.sparse.refine_stage` in one C++ call per stage
(gather fused into the first convolution, bias + ReLU into every epilogue,
residual add + scatter into the last one). It reads the weights in place in
the layout ``switch_to_deploy()`` gives them (the prepacking, once, at
deploy: :func:`sar_backbones.inference.deploy.kernel_layout`); models that
were not deployed run it too, their folded weights laid out per call.
It is compiled once by ``scripts/install.sh`` (``python -m
sar_backbones.inference.native build``) into a cache directory keyed by the
source, the torch version and the CPU's vector extensions; importing the
package never compiles. At run time the library is loaded on the first CPU
float32 call if it is built; otherwise -- or when the file exists but cannot
be loaded (a half-built library, one built against another torch) -- the
PyTorch implementation runs, with one warning naming the build command.

Which implementation runs (for benchmarks and tests): the environment
variable ``SAR_REFINE_KERNEL`` = ``auto`` (default: the fused kernel of the
device where it is there and faster -- this library on CPU float32 on one
thread (:data:`AUTO_MAX_THREADS`), the Triton kernels of
:mod:`..triton_refine` on CUDA), ``native`` (the same, an error where it is
missing), ``torch`` (the PyTorch fallback) or ``triton`` (the Triton kernels
on any device: CUDA, or the CPU under ``TRITON_INTERPRET=1``, which the tests
use), or :func:`set_refine_kernel` in code.
"""
import hashlib
import os
import os.path as osp
import sys
import warnings
from typing import List, Optional

import torch
from torch import Tensor

KERNELS = ('auto', 'native', 'torch', 'triton')
ENV_KERNEL = 'SAR_REFINE_KERNEL'
ENV_DIR = 'SAR_NATIVE_DIR'
BUILD_COMMAND = 'python -m sar_backbones.inference.native build'
LIBRARY_NAME = 'sar_native_refine'
SOURCES = [osp.join(osp.dirname(osp.abspath(__file__)), 'refine.cpp')]
# Vector extensions that change the generated code; the build is keyed by them.
_CPU_FLAGS = ('avx', 'avx2', 'fma', 'f16c', 'avx512f')

# ``auto`` runs this kernel up to this intra-op thread count, the PyTorch
# implementation above it. Measured (BENCHMARKS.md v8, 2-core AVX2 EPYC,
# SAR-R50 at rate 0.5, latency / ResNet-50): one thread, native vs PyTorch
# 0.636 vs 0.715 at 224 and 0.600 vs 0.620 at 800x1216; two threads 0.820 vs
# 0.824 at 224 but 0.676 vs 0.547 at 800x1216, where the kernel's pass over
# the unselected pixels (rate 0: 0.558 vs 0.435) does not scale like ATen's.
AUTO_MAX_THREADS = 1

_override: Optional[str] = None
_loaded: Optional[bool] = None  # None: not tried yet
_load_error: Optional[str] = None
_warned = False


def cpu_flags() -> List[str]:
    """The vector extensions of this CPU among those the build uses (Linux ``/proc/cpuinfo``)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    present = set(line.split(':', 1)[1].split())
                    return [flag for flag in _CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


def compile_flags() -> List[str]:
    """``-O3`` plus exactly the vector extensions this CPU has (never ``-march=native``)."""
    flags = ['-O3', '-ffp-contract=fast', '-std=c++20']
    present = cpu_flags()
    if 'avx' in present:
        flags.append('-mavx')
    if 'avx2' in present and 'fma' in present:
        flags += ['-mavx2', '-mfma']
    return flags


def build_key() -> str:
    """Hash of what the binary depends on: sources, flags, torch and Python versions."""
    digest = hashlib.sha256()
    for path in SOURCES:
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(' '.join(compile_flags() + cpu_flags()).encode())
    digest.update(f'{torch.__version__} {sys.version_info[:2]}'.encode())
    return digest.hexdigest()[:16]


def build_directory() -> str:
    """``$SAR_NATIVE_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/sar_backbones/native``, per key."""
    root = os.environ.get(ENV_DIR) or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.expanduser('~/.cache'), 'sar_backbones', 'native')
    return osp.join(root, build_key())


def library_path() -> str:
    """Where the built library of this source/torch/CPU combination lives."""
    return osp.join(build_directory(), f'{LIBRARY_NAME}.so')


def build(verbose: bool = False) -> str:
    """Compile the library into :func:`build_directory` (no-op when built); returns its path."""
    from torch.utils.cpp_extension import load
    path = library_path()
    if not osp.exists(path):
        os.makedirs(build_directory(), exist_ok=True)
        load(name=LIBRARY_NAME, sources=SOURCES, extra_cflags=compile_flags(),
             build_directory=build_directory(), is_python_module=False, verbose=verbose)
    return path


def load() -> bool:
    """Load the built library once (never compiles); whether ``sar_native::refine_stage`` exists.

    A library that exists but cannot be loaded (half-built, built against
    another torch: ``OSError``/``RuntimeError`` from the loader) counts as not
    built; :func:`load_error` says why.
    """
    global _loaded, _load_error
    if _loaded is None:
        path = library_path()
        _loaded = False
        if osp.exists(path):
            try:
                torch.ops.load_library(path)
                _loaded = hasattr(torch.ops.sar_native, 'refine_stage')
                if not _loaded:
                    _load_error = 'it does not define sar_native::refine_stage'
            except (OSError, RuntimeError) as error:
                _load_error = f'it cannot be loaded ({type(error).__name__}: {error})'
        else:
            _load_error = 'it is not built'
    return _loaded


def load_error() -> Optional[str]:
    """Why :func:`load` found no kernel (None when it did or was not called yet)."""
    return None if _loaded else _load_error


def _not_available() -> str:
    return (f'the native refine kernel of sar_backbones at {library_path()} is not usable: '
            f'{load_error() or "it is not built"}. Build it with `{BUILD_COMMAND}` '
            '(scripts/install.sh does)')


def set_refine_kernel(kernel: Optional[str]) -> None:
    """Choose the refine op (one of :data:`KERNELS`); None: the env variable."""
    if kernel is not None and kernel not in KERNELS:
        from sar_backbones.models.errors import InvalidArgumentError
        raise InvalidArgumentError(f'set_refine_kernel: kernel must be one of {KERNELS}, '
                                   f'got {kernel!r}')
    global _override
    _override = kernel


def refine_kernel() -> str:
    """The chosen implementation (:func:`set_refine_kernel`, else ``$SAR_REFINE_KERNEL``)."""
    if _override is not None:
        return _override
    kernel = os.environ.get(ENV_KERNEL, 'auto').strip().lower() or 'auto'
    if kernel not in KERNELS:
        from sar_backbones.models.errors import InvalidArgumentError
        raise InvalidArgumentError(f'{ENV_KERNEL} must be one of {KERNELS}, got {kernel!r}')
    return kernel


def use_native(x: Tensor) -> bool:
    """Whether the native kernel runs for this input (CPU float32, chosen and built)."""
    global _warned
    kernel = refine_kernel()
    if kernel in ('torch', 'triton') or x.device.type != 'cpu' or x.dtype != torch.float32:
        return False
    if kernel == 'auto' and torch.get_num_threads() > AUTO_MAX_THREADS:
        return False
    if load():
        return True
    if kernel == 'native':
        raise RuntimeError(f'{ENV_KERNEL}=native: {_not_available()}')
    if not _warned:
        _warned = True
        warnings.warn(f'{_not_available()}; the sparse path runs the slower PyTorch '
                      'implementation meanwhile', RuntimeWarning, stacklevel=3)
    return False


def supports(weights: List[Tensor], convs_per_block: int, shortcuts: List[int]) -> bool:
    """Whether the kernel handles these blocks: 1x1/3x3 convolutions, 3x3 only first or second.

    Phase A of a block runs its first convolution on every selected pixel,
    phase B the rest patch by patch, so a 3x3 convolution (which reads a halo)
    must be the first or the second. True for every SAR-ResNet/ResNeXt block.
    """
    if convs_per_block < 2:
        return False
    start = 0
    for has_shortcut in shortcuts:
        for index, weight in enumerate(weights[start:start + convs_per_block + has_shortcut]):
            size = weight.shape[-1]
            if weight.dim() != 4 or weight.shape[-2] != size or size not in (1, 3) or \
                    (size == 3 and index >= 2):
                return False
        start += convs_per_block + has_shortcut
    return True


def refine_stage(x: Tensor, masks: Tensor, weights: List[Tensor], biases: List[Tensor],
                 convs_per_block: int, shortcuts: List[int], last_relus: List[int],
                 dilation: int) -> Tensor:
    """``sar_native::refine_stage``; an error naming the build command when it is not built."""
    if not load():
        raise RuntimeError(_not_available())
    return torch.ops.sar_native.refine_stage(x, masks, weights, biases, convs_per_block,
                                             shortcuts, last_relus, dilation)
