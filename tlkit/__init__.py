"""tlkit: transfer learning for image classification with timm backbones and Lightning.

The public names load on first use (PEP 562), so that `import tlkit` and the command line's
parser cost no torch, Optuna or ONNX import until a name that needs them is used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "ClassifierHead": "tlkit.heads",
    "DatasetError": "tlkit.errors",
    "ExportError": "tlkit.errors",
    "ExportedModel": "tlkit.export",
    "FinetuneConfig": "tlkit.config",
    "ImageDataModule": "tlkit.data",
    "Preprocessing": "tlkit.backbones",
    "ProbeResult": "tlkit.probe",
    "TransferClassifier": "tlkit.module",
    "WeightsUnavailableError": "tlkit.errors",
    "create_backbone": "tlkit.backbones",
    "export_run": "tlkit.export",
    "finetune": "tlkit.finetune",
    "fit_probe": "tlkit.probe",
    "layer_groups": "tlkit.backbones",
    "load_exported": "tlkit.export",
    "load_rgb": "tlkit.data",
    "preprocessing": "tlkit.backbones",
    "probe_features": "tlkit.probe",
    "run_sanity_checks": "tlkit.sanity",
    "run_search": "tlkit.search",
    "scan": "tlkit.data",
}

__all__ = sorted([*_HOMES, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`tlkit.finetune` is the function, though a submodule has the same name: importing the
    submodule would otherwise replace the package attribute with the module."""

    @property
    def finetune(self):
        return importlib.import_module("tlkit.finetune").finetune

    @finetune.setter
    def finetune(self, submodule: types.ModuleType) -> None:
        """Where the import system records the loaded submodule; it stays in sys.modules."""


sys.modules[__name__].__class__ = _Package
