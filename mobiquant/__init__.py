"""MoBiQuant: one elastic checkpoint per LLM, run at any precision from 2 to 2K bits, chosen per token.

Importing the package registers the ``mobiquant`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(checkpoint_dir)`` loads an elastic checkpoint. The import itself is
light (no torch, no transformers): the public names load on first use, and the registration runs as soon as
transformers builds its table of quantization methods, or at once when transformers already has.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

# The name mobiquant on the package index is not this project: every message that tells a user to install
# it says where from.
INSTALL_HINT = "install mobiquant from its source (`pip install .` in a MoBiQuant checkout; it is not on PyPI)"

_EXPORTS = {
    "CalibrationConfig": "mobiquant.calibration",
    "quantize_model": "mobiquant.calibration",
    "quantize": "mobiquant.api",
    "load_checkpoint": "mobiquant.checkpoint",
    # Named by the message that refuses another quantization_config at from_pretrained.
    "MoBiQuantConfig": "mobiquant.checkpoint",
    "save_checkpoint": "mobiquant.checkpoint",
    "MoBiLinear": "mobiquant.layers",
    "MoBiRouter": "mobiquant.layers",
    "calibrate_thresholds": "mobiquant.precision",
    "hold_budget": "mobiquant.precision",
    "set_precision": "mobiquant.precision",
    "track_bits": "mobiquant.precision",
    "SlicedWeight": "mobiquant.slicing",
    "slice_weight": "mobiquant.slicing",
}

__all__ = ["INSTALL_HINT", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mobiquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# transformers keeps its quantization methods in this module; the MoBiQuant method joins them once it exists.
_TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"


class _RegisterAfterLoading(importlib.abc.Loader):
    """Runs the transformers registry module with its own loader, then registers MoBiQuant in it."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterWithTransformers) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        # mobiquant.checkpoint registers on import; it imports only transformers modules that are complete by now.
        importlib.import_module("mobiquant.checkpoint")

    def __getattr__(self, name: str) -> Any:
        # get_source, get_filename, ...: tracebacks and inspect read the module through its loader.
        return getattr(self._loader, name)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Finds the transformers registry module through the other finders and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != _TRANSFORMERS_REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisterAfterLoading(spec.loader, self)
                return spec
        return None


if _TRANSFORMERS_REGISTRY in sys.modules:
    importlib.import_module("mobiquant.checkpoint")
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
