"""tlkit: transfer learning for image classification with timm backbones and Lightning.

The public names load on first use (PEP 562), so that `import tlkit` and the command line's
parser cost no torch, Optuna or ONNX import until a name that needs them is used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# albumentations asks PyPI for a newer release of itself whenever it is imported (a request
# with a 2 s timeout after the name lookup, and a warning on every command where the machine is
# offline); tlkit runs offline by design, so it turns that off the way albumentations documents,
# unless the user has set the variable.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# public name -> the module that defines it
_HOMES = {
    "ClassifierHead": "tlkit.model.heads",
    "DataFacts": "tlkit.runfolder",
    "DatasetError": "tlkit.errors",
    "ExportError": "tlkit.errors",
    "ExportedModel": "tlkit.infer.export",
    "FinetuneConfig": "tlkit.config",
    "ImageDataModule": "tlkit.data.datamodule",
    "Preprocessing": "tlkit.runfolder",
    "ProbeResult": "tlkit.train.probe",
    "TransferClassifier": "tlkit.model.classifier",
    "WeightsUnavailableError": "tlkit.errors",
    "create_backbone": "tlkit.model.backbones",
    "export_run": "tlkit.infer.export",
    "finetune": "tlkit.train.finetune",
    "fit_probe": "tlkit.train.probe",
    "layer_groups": "tlkit.model.backbones",
    "load_exported": "tlkit.infer.export",
    "load_rgb": "tlkit.data.images",
    "preprocessing": "tlkit.model.backbones",
    "probe_features": "tlkit.train.probe",
    "run_sanity_checks": "tlkit.commands.sanity",
    "run_search": "tlkit.commands.search",
    "scan": "tlkit.data.sources",
    "TASKS": "tlkit.model.tasks",
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
