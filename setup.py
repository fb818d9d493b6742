"""Install sar_backbones: ``pip install -e .`` (the stack itself: ``scripts/install.sh``)."""
from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    namespace: dict = {}
    exec(Path('sar_backbones/version.py').read_text(), namespace)
    return namespace['__version__']


def read_requirements(name: str) -> list:
    lines = Path('requirements', name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


setup(
    name='sar_backbones',
    version=read_version(),
    description='SAR-ResNet (Spatially Adaptive feature Refinement) backbones for OpenMMLab',
    long_description=Path('README.md').read_text() if Path('README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['sar_backbones', 'sar_backbones.*']),
    # The native refine kernel's source, compiled after install (scripts/install.sh).
    package_data={'sar_backbones.inference.native': ['*.cpp']},
    # mmcv must be built from source with ops (scripts/install.sh); it is not
    # listed here so that pip never tries to build it on its own.
    install_requires=read_requirements('torch.txt') + read_requirements('runtime.txt'),
    extras_require={'tests': read_requirements('tests.txt')},
    zip_safe=False,
)
