"""Registers the task wrappers of every installed OpenMMLab task library.

Imported lazily by the ``sar_backbones`` model registry (its ``locations``)
the first time a config builds a ``sar_backbones.*`` model, so that
``import sar_backbones`` itself needs neither mmdet, mmseg nor mmpretrain.
A library that is not installed is skipped; its wrappers then do not exist.
"""
import importlib
import importlib.util

# Wrapper module -> the task library it subclasses.
TASK_MODULES = {
    'detectors': 'mmdet',
    'segmentors': 'mmseg',
    'classifiers': 'mmpretrain',
}


def register_installed() -> list:
    """Import the wrapper modules whose library is installed; returns their names."""
    loaded = []
    for module, library in TASK_MODULES.items():
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(f'{__package__}.{module}')
            loaded.append(module)
    return loaded


register_installed()
