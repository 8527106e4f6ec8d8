"""tlkit: transfer learning for image classification with timm backbones and Lightning."""

__version__ = "0.1.0"

from tlkit.backbones import (  # noqa: E402
    Preprocessing,
    WeightsUnavailableError,
    create_backbone,
    layer_groups,
    preprocessing,
)
from tlkit.config import FinetuneConfig  # noqa: E402
from tlkit.data import DatasetError, ImageDataModule, load_rgb, scan  # noqa: E402
from tlkit.export import ExportedModel, ExportError, export_run, load_exported  # noqa: E402
from tlkit.finetune import finetune  # noqa: E402
from tlkit.heads import ClassifierHead  # noqa: E402
from tlkit.module import TransferClassifier  # noqa: E402
from tlkit.sanity import run_sanity_checks  # noqa: E402
from tlkit.search import run_search  # noqa: E402

__all__ = [
    "ClassifierHead",
    "DatasetError",
    "ExportError",
    "ExportedModel",
    "FinetuneConfig",
    "ImageDataModule",
    "Preprocessing",
    "TransferClassifier",
    "WeightsUnavailableError",
    "__version__",
    "create_backbone",
    "export_run",
    "finetune",
    "layer_groups",
    "load_exported",
    "load_rgb",
    "preprocessing",
    "run_sanity_checks",
    "run_search",
    "scan",
]
