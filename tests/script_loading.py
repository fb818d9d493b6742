"""Import a script of the repository (``tools/``, ``benchmarks/``) as a module, as it would run."""
import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """The module of ``REPO/relative_path``, e.g. ``load_script('tools/demo.py')``."""
    path = REPO / relative_path
    name = relative_path[:-len('.py')].replace('/', '_')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
