"""Ship a run's model: ONNX, TorchScript or safetensors, with a JSON card beside it.

The exported network is the run's best checkpoint in eval mode: backbone, head and the task's
output layer (a softmax; multi-label: a sigmoid). It takes a preprocessed float32 batch
``images`` (N, 3, S, S), N free, and returns ``probabilities`` (N, C), the numbers `tlkit
predict` reports. The card (``card.json``) holds what serving needs without tlkit: the task,
class names and (multi-label) each class's decision threshold, the preprocessing (resize, centre
crop, mean, std), where the model came from and how it measured, library versions, and the
SHA-256 of the model file, checked before the file is loaded; and the test-time averaging
preset the run chose on its validation split (`--tta auto`), with its views spelt out for
serving code.

Every export is verified before it is kept: the written file is loaded back exactly as
`predict` loads it, and its probabilities on a few real images of the run's data (seeded random
tensors if the data is gone) must equal the checkpoint's within 1e-4, at the full batch and at
batch size 1. Files are written to a temporary name and renamed, so a folder with a card always
holds a complete, verified export.

A format is one entry of the table `FORMATS` (name -> model file, writer, loader); the CLI's
--format choices are its keys.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import itertools
import json
import os
import platform
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file as save_safetensors
from torch import nn

from tlkit import __version__
from tlkit.config import FinetuneConfig
from tlkit.data.augment import DEFAULT_TRAINED_SHORT_SIDES, eval_transform
from tlkit.data.images import UNREAD_IMAGE_FORMATS, find_decode_problems, load_rgb
from tlkit.data.sources import csv_rows, walk_images
from tlkit.errors import DatasetError, ExportError, OutputExistsError
from tlkit.infer.tta import plan
from tlkit.metrics import DEFAULT_THRESHOLD
from tlkit.model.backbones import create_backbone, pooled_feature_width
from tlkit.model.classifier import TransferClassifier
from tlkit.model.heads import ClassifierHead
from tlkit.model.tasks import TaskDefinition, task_of
from tlkit.runfolder import (
    BEST_CHECKPOINT,
    DataFacts,
    Preprocessing,
    RunSummary,
    open_run,
    write_atomic,
)

CARD = "card.json"
CARD_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# Largest accepted |exported - checkpoint| probability. Probabilities, not logits: they are
# what users get, and bounded, while float32 logits come close to 1e-4 by themselves (the demo
# run's logits differ by 5e-5 between a batch of 8 and one image at a time, in PyTorch alone).
TOLERANCE = 1e-4
VERIFICATION_IMAGES = 8
SHIPPED_FILE_MODE = 0o644  # temporary files are created private; what ships is readable
# The OpenCV flag tlkit resizes with (augment.INTERPOLATIONS, which falls back to bilinear for
# other names), named in the card so that serving code resizes identically: Pillow's kernels of
# the same names differ slightly. A test keeps the two tables equal.
OPENCV_INTERPOLATIONS = {
    "nearest": "INTER_NEAREST",
    "bilinear": "INTER_LINEAR",
    "bicubic": "INTER_CUBIC",
    "area": "INTER_AREA",
    "lanczos": "INTER_LANCZOS4",
}
PREPROCESSING_STEPS = (
    "decode to 8-bit RGB; resize the short side to resize_short_side pixels (the other side "
    "scaled by the same factor and rounded) with cv2.resize and the opencv_interpolation flag; "
    "centre-crop input_size x input_size (offsets (width - input_size) // 2 and "
    "(height - input_size) // 2); divide by 255; subtract mean and divide by std per RGB "
    "channel; HWC -> CHW; stack into a float32 batch"
)

TTA_STEPS = (
    "views 'single': the preprocessed image itself; 'crops': for each side L of scale_sizes, "
    "resize the short side to L (as preprocessing resizes), centre-crop L x L, and take the "
    "input_size x input_size crops at its four corners and its centre (one crop where L is "
    "input_size); 'whole': each L x L square itself. With mirrored, every view also flipped "
    "horizontally. Average the views' probabilities (average), each scale weighing the same "
    "and its views equally within it"
)

Runner = Callable[[torch.Tensor], torch.Tensor]  # preprocessed batch -> probabilities, on CPU


@dataclass(frozen=True)
class ExportFormat:
    """How one format is written from a network and loaded back from the file's bytes."""

    model_file: str
    write: Callable[[nn.Module, torch.Tensor, Path], None]
    load: Callable[[bytes, dict[str, Any]], Runner]
    libraries: tuple[str, ...]  # whose versions the card records, beside torch and timm


def inference_network(backbone: nn.Module, head: nn.Module, task: TaskDefinition) -> nn.Sequential:
    """Backbone, head and the task's output layer, in eval mode: the network every format holds
    (state-dict keys ``backbone.*`` and ``head.*``; the output layer has none)."""
    layers = OrderedDict(backbone=backbone, head=head, output=task.output_layer())
    return nn.Sequential(layers).eval()


def card_task(card: dict[str, Any]) -> TaskDefinition:
    """The task of an exported model (cards from before the field: single-label)."""
    return task_of(card.get("task", "single-label"))


def build_network(card: dict[str, Any]) -> nn.Sequential:
    """An untrained network of the card's architecture (timm backbone + tlkit head + the
    task's output layer)."""
    model = card["model"]
    size = card["preprocessing"]["input_size"]
    backbone = create_backbone(model["backbone"], pretrained="none", img_size=size)
    head = ClassifierHead(
        pooled_feature_width(backbone),
        len(card["classes"]),
        model["head_dropout"],
        model["head_hidden"],
    )
    return inference_network(backbone, head, card_task(card))


# ONNX ---------------------------------------------------------------------------------------


def _import_onnx(module: str):
    """An ONNX module from the optional extra, or a message saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExportError(
            f"ONNX needs {module}, part of the optional extra: pip install 'tlkit[onnx]' "
            "(onnx, onnxruntime, onnxscript)"
        ) from error


def _write_onnx(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    """PyTorch's torch.export-based exporter (its default since 2.9), which needs onnxscript."""
    _import_onnx("onnxscript")
    torch.onnx.export(
        network,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,  # one file, so one SHA-256 covers the whole model
        dynamo=True,
        verbose=False,
    )


def _load_onnx(data: bytes, card: dict[str, Any]) -> Runner:
    session = _import_onnx("onnxruntime").InferenceSession(data, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.float().cpu().numpy()})
        return torch.from_numpy(probabilities)

    return run


# TorchScript --------------------------------------------------------------------------------


def _write_torchscript(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traced, not scripted: EfficientNet has no data-dependent control flow, and timm's 'same'
    padding (tf_* models) is fixed for the traced input size, which the card states. Tracing's
    own re-run check is skipped: the export is verified against the checkpoint anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(network, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _load_torchscript(data: bytes, card: dict[str, Any]) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    return _torch_runner(module)


# safetensors --------------------------------------------------------------------------------


def _write_safetensors(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    tensors = {key: value.contiguous() for key, value in network.state_dict().items()}
    save_safetensors(tensors, str(path), metadata={"format": "pt"})


def _load_safetensors(data: bytes, card: dict[str, Any]) -> Runner:
    network = build_network(card)
    network.load_state_dict(load_safetensors_bytes(data))  # plain tensors, no pickle
    return _torch_runner(network.eval())


def _torch_runner(module: nn.Module) -> Runner:
    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(images.float().cpu())

    return run


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(
        "model.onnx", _write_onnx, _load_onnx, ("onnx", "onnxruntime", "onnxscript")
    ),
    "torchscript": ExportFormat("model.pt", _write_torchscript, _load_torchscript, ()),
    "safetensors": ExportFormat(
        "model.safetensors", _write_safetensors, _load_safetensors, ("safetensors",)
    ),
}


# Exporting ----------------------------------------------------------------------------------


def export_run(run_dir: str | Path, out: str | Path, format: str = "onnx") -> dict[str, Any]:
    """Export a run folder's best checkpoint to `out`, verify it, write its card; return the card.

    Raises `ExportError` if the exported model's probabilities differ from the checkpoint's by
    more than `TOLERANCE`; nothing is kept then.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}': choose {', '.join(FORMATS)}")
    run, out = open_run(run_dir), Path(out)
    for name, what in ((CARD, "an exported model"), (BEST_CHECKPOINT, "a run")):
        if (out / name).exists():
            raise OutputExistsError(f"{out} already holds {what} ({name}); choose another --out")
    model = TransferClassifier.load_checkpoint(run.best_checkpoint)
    network = inference_network(model.backbone, model.head, model.task)
    images, source = verification_images(run.config, model.preprocessing)
    card = _card(model, run.summary, run.data, run.folder, format)
    out.mkdir(parents=True, exist_ok=True)
    data, difference = _write_verified(FORMATS[format], network, images, card, out)
    card["sha256"] = hashlib.sha256(data).hexdigest()
    card["verification"] = {
        "inputs": source,
        "batch_sizes": [len(images), 1],
        "max_abs_difference": difference,
        "tolerance": TOLERANCE,
    }
    write_atomic(out / CARD, json.dumps(card, indent=2) + "\n")  # last: a card means complete
    os.chmod(out / CARD, SHIPPED_FILE_MODE)
    return card


def _write_verified(
    export_format: ExportFormat,
    network: nn.Module,
    images: torch.Tensor,
    card: dict[str, Any],
    out: Path,
) -> tuple[bytes, float]:
    """Write the model under a temporary name, load it back as `load_exported` does, compare
    its probabilities with the checkpoint's, and only then rename it; return its bytes and the
    largest difference."""
    with torch.inference_mode():
        expected = network(images)
    example = torch.cat([images, images])[:2]  # two images: a batch of 1 would fix the axis
    file_descriptor, name = tempfile.mkstemp(dir=out, prefix=".model-", suffix=".tmp")
    os.close(file_descriptor)
    temporary = Path(name)
    try:
        export_format.write(network, example, temporary)
        data = temporary.read_bytes()
        run = export_format.load(data, card)
        difference = max(
            float((run(images) - expected).abs().max()),
            float((run(images[:1]) - expected[:1]).abs().max()),  # the batch size is free
        )
        if not difference <= TOLERANCE:
            raise ExportError(
                f"the exported {card['format']} model differs from the checkpoint by up to "
                f"{difference:.3g} in a probability (tolerance {TOLERANCE:g}); nothing was kept"
            )
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, SHIPPED_FILE_MODE)
        os.replace(temporary, out / export_format.model_file)
    finally:
        temporary.unlink(missing_ok=True)
    return data, difference


def _card(
    model: TransferClassifier, summary: RunSummary, data: DataFacts, run_dir: Path, format: str
) -> dict[str, Any]:
    hparams = model.hparams
    preprocessing = model.preprocessing
    size = preprocessing.input_size
    classes = model.class_names
    libraries = ("torch", "timm", *FORMATS[format].libraries)
    thresholds = dict(zip(classes, model.thresholds, strict=True))
    return {
        "tlkit_export_card": CARD_VERSION,
        "format": format,
        "model_file": FORMATS[format].model_file,
        "sha256": None,  # filled in once the file is verified
        "task": model.task.name,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(classes)],
            "semantics": model.task.output_semantics,
        },
        "classes": classes,
        "thresholds": thresholds if model.task.thresholded else None,
        "preprocessing": {
            "input_size": size,
            "resize_short_side": round(size / preprocessing.crop_pct),
            "interpolation": preprocessing.interpolation,
            "opencv_interpolation": OPENCV_INTERPOLATIONS.get(
                preprocessing.interpolation, "INTER_LINEAR"
            ),
            "crop_pct": preprocessing.crop_pct,
            "mean": list(preprocessing.mean),
            "std": list(preprocessing.std),
            "steps": PREPROCESSING_STEPS,
        },
        "model": {
            "backbone": hparams.backbone,
            "weights": summary.weights,
            "strategy": hparams.strategy,
            "unfreeze_stages": hparams.unfreeze_stages if hparams.strategy == "partial" else None,
            "head_hidden": hparams.head_hidden,
            "head_dropout": hparams.dropout,
            "trained_with_hflip": model.trained_with_hflip,
            "trained_short_sides": list(model.trained_short_sides),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
        },
        "metrics": {
            **{
                key: getattr(summary, key)
                for key in (
                    "best_val_acc",
                    "best_epoch",
                    "test_acc",
                    "test_acc_interval",
                    "test_acc_top5",
                    "train_images",
                    "val_images",
                    "test_images",
                    "monitor",
                    "best_val_metrics",
                    "test_metrics",
                )
            },
            "train_images_per_class": data.images_per_class.get("train"),
        },
        "test_time_augmentation": _chosen_tta(model, summary.tta_choice),
        "source": {"run": str(run_dir.resolve()), "checkpoint": BEST_CHECKPOINT},
        "versions": {
            "tlkit": __version__,
            "python": platform.python_version(),
            **{library: metadata.version(library) for library in libraries},
        },
    }


def _chosen_tta(model: TransferClassifier, choice: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's record of the test-time averaging preset the run chose on validation (what
    `--tta auto` uses): its views, spelt out for serving code, and the evidence; None for a
    run that chose none."""
    if choice is None:
        return None
    chosen = plan(
        choice["preset"],
        model.preprocessing,
        mirrored=model.trained_with_hflip,
        trained_short_sides=model.trained_short_sides,
    )
    return {
        "preset": chosen.preset,
        "scale_sizes": list(chosen.scale_sizes),
        "views": chosen.views,
        "mirrored": chosen.mirrored,
        "views_per_image": chosen.views_per_image,
        "average": chosen.average,
        "steps": TTA_STEPS,
        "chosen_on_validation": {  # runs before the early stop recorded no `not_measured`
            key: choice.get(key)
            for key in ("images", "rule", "candidates", "not_measured", "stopped_early")
        },
    }


def verification_images(
    config: FinetuneConfig, preprocessing: Preprocessing, count: int = VERIFICATION_IMAGES
) -> tuple[torch.Tensor, str]:
    """Up to `count` preprocessed images of the run's data (`config.data_dir`), taken in turn
    from its classes, or seeded random tensors if the data is no longer there; also what was
    used, for the card."""
    data = Path(config.data_dir) if config.data_dir else None
    candidates = (  # room for bad files
        _images_by_class(data, count, config.csv_paths_outside_root)[: 4 * count] if data else []
    )
    max_pixels = config.max_image_pixels
    problems = find_decode_problems(candidates, max_pixels)
    paths = [path for path, problem in zip(candidates, problems, strict=True) if not problem]
    if paths:
        transform = eval_transform(preprocessing)
        images = [
            transform(image=load_rgb(path, max_pixels=max_pixels))["image"]
            for path in paths[:count]
        ]
        return torch.stack(images), f"{len(images)} images from {data}"
    size = preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, size, size, generator=generator)
    return images, f"{count} seeded random tensors (no readable image found in the run's data)"


def _images_by_class(data: Path, count: int, allow_outside_root: bool = False) -> list[str]:
    """Up to `count` image files from each class, interleaved across classes: the folders of a
    class-folder tree (the first `count` of them holding images) or the labels of a path,label
    CSV (multi-label: of each label set; paths outside the CSV's folder only if
    `allow_outside_root`)."""
    if data.is_file() and data.suffix.lower() == ".csv":
        groups: dict[str, list[str]] = {}
        root = data.parent.resolve()
        try:
            _kind, rows = csv_rows(data)
        except DatasetError:  # changed since training: verify on random tensors instead
            rows = []
        for _line, relative, names in rows:
            group = groups.setdefault(";".join(names), [])
            if len(group) < count:
                path = (root / relative).resolve()
                readable = path.suffix.lower() not in UNREAD_IMAGE_FORMATS and path.is_file()
                if (allow_outside_root or path.is_relative_to(root)) and readable:
                    group.append(str(path))
        by_class = list(groups.values())
    else:
        folders = (images[:count] for images, _, _ in walk_images(data) if images)
        by_class = list(itertools.islice(folders, count))  # one image from each would do
    return [path for paths in itertools.zip_longest(*by_class) for path in paths if path]


# Loading ------------------------------------------------------------------------------------


def is_export_folder(path: str | Path) -> bool:
    """Whether `path` is a folder written by `export_run` (it holds a card)."""
    return (Path(path) / CARD).is_file()


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card of an export folder, with the fields loading relies on checked."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise ExportError(f"{folder} is not a tlkit export folder: {CARD} is missing")
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not valid JSON ({error})") from error
    required = ("format", "model_file", "sha256", "classes", "preprocessing", "model")
    missing = [key for key in required if not isinstance(card, dict) or key not in card]
    if missing:
        raise ExportError(f"{path}: not a tlkit export card, missing {', '.join(missing)}")
    if card["format"] not in FORMATS:
        raise ExportError(f"{path}: unknown format '{card['format']}'")
    if Path(card["model_file"]).name != card["model_file"]:
        raise ExportError(f"{path}: model_file must be a file name in the same folder")
    return card


class ExportedModel:
    """An exported model and its card, a `tlkit.infer.predict.Predictor` like a run's checkpoint."""

    def __init__(self, card: dict[str, Any], run: Runner) -> None:
        self.card = card
        self._run = run

    @property
    def class_names(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.card["preprocessing"])

    @property
    def trained_with_hflip(self) -> bool:
        """Whether training flipped images horizontally; cards from before the field was
        recorded come from runs that did, unless told otherwise."""
        return bool(self.card["model"].get("trained_with_hflip", True))

    @property
    def task(self) -> TaskDefinition:
        return card_task(self.card)

    @property
    def thresholds(self) -> list[float]:
        """Per class, the probability from which a multi-label prediction includes it (the
        card's, chosen on validation)."""
        chosen = self.card.get("thresholds") or {}
        return [float(chosen.get(name, DEFAULT_THRESHOLD)) for name in self.class_names]

    @property
    def trained_short_sides(self) -> tuple[float, float]:
        """The short sides training resized to, relative to the input size; cards from before
        the field was recorded come from runs with the default scale augmentation."""
        low, high = self.card["model"].get("trained_short_sides", DEFAULT_TRAINED_SHORT_SIDES)
        return float(low), float(high)

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) of a preprocessed batch (N, 3, S, S), computed on the CPU."""
        return self._run(images)


def load_exported(folder: str | Path) -> ExportedModel:
    """Load an export folder; the model file's SHA-256 must match the card before it is loaded.

    The bytes are read once, hashed and loaded from memory, so the file checked is the file run.
    """
    card = read_card(folder)
    path = Path(folder) / card["model_file"]
    if not path.is_file():
        raise ExportError(f"{path}: the model file named by {CARD} is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = str(card["sha256"])
    if digest != expected:
        raise ExportError(
            f"{path}: SHA-256 mismatch (file {digest[:12]}..., {CARD} {expected[:12]}...): "
            "the file was changed or corrupted after export and is not loaded"
        )
    return ExportedModel(card, FORMATS[card["format"]].load(data, card))
