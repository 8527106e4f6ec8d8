"""The one typed configuration of a fine-tuning run.

`FinetuneConfig` is the single source of truth: the CLI flags, the YAML files read with
`--config` and written into every run folder, and the recipes' keyword arguments are all derived
from its fields, never written out twice.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tlkit.choices import TTA_CHOICE_MAX_IMAGES
from tlkit.errors import ConfigError

# The strategies a model trains with (strategies.STRATEGIES), and `auto`, which measures the data
# and picks one of them (tlkit/train/auto.py).
TrainingStrategy = Literal["features", "partial", "full"]
Strategy = Literal["auto", TrainingStrategy]
Optimizer = Literal["adamw", "sgd"]
# No ddp_spawn: Lightning's spawn launcher returns none of the spawned processes' state (the
# epoch history, the feature-cache report), so its run folders would be incomplete; ddp runs
# the same training from the CLI and from scripts.
DistStrategy = Literal["auto", "ddp", "fsdp"]
Precision = Literal["32", "16-mixed", "bf16-mixed"]
Logger = Literal["csv", "tensorboard"]
Verify = Literal["full", "header", "none"]
# What a model learns (model/tasks.py TASKS): one class per image, or any number of classes;
# `auto` reads it from the data (a CSV with a `labels` column is multi-label).
Task = Literal["single-label", "multi-label"]
TaskChoice = Literal["auto", Task]
# The validation metrics that can pick best.ckpt and stop early (tlkit/metrics.py's names), and
# `auto`, which chooses by task and class balance (model/tasks.py).
Monitor = Literal["auto", "acc", "balanced_acc", "macro_f1", "map", "micro_f1", "exact_match"]
# `--monitor auto` watches balanced accuracy instead of accuracy when the training split's largest
# class holds more than this many times the images of its smallest. Not a measured optimum: on
# long-tailed Fashion-MNIST at 3:1, 10:1 and 30:1 the two monitors picked the same epoch or
# epochs 0.5 points apart (docs/benchmarks.md, "Class imbalance"), so switching from 3:1 on
# costs nothing measured, and the checkpoint is then chosen on what imbalanced data needs.
BALANCED_MONITOR_ABOVE_RATIO = 3.0
ClassWeights = Literal["none", "balanced"]
Sampling = Literal["shuffle", "balanced"]  # data/datasets.py TRAINING_SAMPLERS


def value_type(kind: Any) -> Any:
    """The type of a field's values: `int` for `int | None` (a field auto may choose)."""
    arguments = [argument for argument in typing.get_args(kind) if argument is not type(None)]
    is_optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return arguments[0] if is_optional and len(arguments) == 1 else kind


def coerce_value(key: str, value: Any, kind: Any) -> Any:
    """A value for a field of type `kind`: YAML reads `1e-4` (no dot) as a string, so numbers
    written so are converted; anything else that is not a number is rejected."""
    kind = value_type(kind)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"config key {key}: {value!r} is not a {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field whose help text becomes the CLI flag's help."""
    return field(default=default, metadata={"help": help, **metadata})


# The fields `--strategy auto` chooses from measurements unless they are given
# (tlkit/train/auto.py), and their fixed values, used when a strategy is named (tlkit's defaults
# before auto) and by the API's defaults (`FinetuneConfig.field_default`). img_size's fixed
# value is the backbone's pretrained input size.
FIXED_CHOICES: dict[str, Any] = {
    "strategy": "partial",
    "unfreeze_stages": 2,
    "lp_ft": False,
    "backbone_lr_scale": 0.1,
    "epochs": 10,
    "img_size": None,
    "augment": True,
    "short_side_min": 256,
    "short_side_max": 480,
    "color_jitter": 0.4,
    "patience": 5,
}
AUTO_HELP = " (default: chosen by --strategy auto; with a named strategy {})"

# The fields left to the device when not given (None), and what the run sets them to there
# (tlkit/train/hardware.py's device_defaults); --print-config shows these beside them.
DEVICE_DEFAULTS: dict[str, str] = {
    "precision": (
        "set when the run starts: 32 on a CPU; on one CUDA device, with --channels-last "
        "not given either, the faster of 32 and bf16-mixed (else 16-mixed) measured at the "
        "run's size; else bf16-mixed (else 16-mixed)"
    ),
    "channels_last": (
        "set when the run starts: on for a CPU; on one CUDA device, with --precision not "
        "given either, measured with it; else on"
    ),
}


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run; YAML-serialisable and re-runnable."""

    data_dir: str = _option(
        "", "image folder (class sub-folders, or train/ val/ test/ splits) or a path,label CSV"
    )
    out: str = _option("runs/exp", "run folder: checkpoints, metrics.csv, summary.json, config")
    logger: Logger = _option(
        "csv",
        "training log in the run folder: csv (metrics.csv) or tensorboard (tensorboard/ event "
        "files for `tensorboard --logdir`; needs the tensorboard package)",
    )

    task: TaskChoice = _option(
        "auto",
        "single-label: one class per image (softmax, cross-entropy); multi-label: any number "
        "of classes per image (a sigmoid per class, binary cross-entropy; a CSV with a "
        "'labels' column of ';'-separated labels); auto: as the data is labelled",
    )

    # Backbone and weights
    backbone: str = _option("tf_efficientnet_lite0", "any timm model name")
    pretrained: str = _option(
        "hub",
        "weights: 'hub' (timm's download), 'bundled' (offline packages installed with tlkit, "
        "for tf_efficientnet_lite0, tf_efficientnet_lite1 and tf_efficientnet_lite2), a local "
        ".pth/.safetensors file, or 'none' (random init)",
    )
    drop_path_rate: float = _option(0.0, "stochastic depth in the backbone, where timm offers it")

    # Transfer strategy
    strategy: Strategy = _option(
        "auto",
        "auto: measure the data (images per class, image sizes, a linear probe) and choose the "
        "strategy, stages, epochs, input size and augmentation; features: frozen backbone; "
        "partial: last N stages trainable; full: all trainable",
    )
    unfreeze_stages: int | None = _option(
        None, "stages (timm layer groups) trained by 'partial'" + AUTO_HELP.format(2)
    )
    cache: bool = _option(
        True, "features strategy: extract backbone features once and train the head on them"
    )
    cache_dir: str = _option(
        "",
        "cache folder, shareable by runs: cached features and, in shards/, the chunks of a "
        "converted dataset read from an object store (default: OUT/cache)",
    )
    cache_augmented_views: int = _option(
        0, "features cached per training image from the train augmentation (0: one plain view)"
    )
    backbone_lr_scale: float | None = _option(
        None,
        "learning rate of pretrained layers relative to --lr (partial and full)"
        + AUTO_HELP.format(0.1),
    )
    lp_ft: bool | None = _option(
        None,
        "partial and full: start from a linear probe's head, fitted on cached features (LP-FT, "
        "Kumar et al. 2022), instead of a zero head" + AUTO_HELP.format("off"),
    )

    # Head
    dropout: float = _option(0.5, "dropout before the classifier")
    head_hidden: int = _option(0, "width of an optional hidden layer in the head (0: none)")

    # Optimisation
    epochs: int | None = _option(None, "maximum epochs" + AUTO_HELP.format(10))
    epoch_batches: int = _option(
        0,
        "training batches per epoch and process (0: all of them); --strategy auto sets it when "
        "its schedule ends part-way through a pass over the data",
    )
    budget: str = _option(
        "",
        "time budget of the whole run, e.g. 90s, 10m, 2h or 1h30m: --strategy auto measures "
        "this device's training speed, sizes the schedule to end within it and re-plans its "
        "epochs from their own times as it trains ('': auto's default schedule)",
    )
    batch_size: int = _option(64, "images per batch (per device)")
    lr: float = _option(1e-3, "learning rate of the new head")
    weight_decay: float = _option(1e-4, "weight decay (not applied to biases and norm layers)")
    optimizer: Optimizer = _option("adamw", "adamw, or sgd with Nesterov momentum 0.9")
    warmup_epochs: float = _option(
        1.0, "linear warm-up before the cosine decay, in epochs (at most 10%% of the run)"
    )
    label_smoothing: float = _option(0.0, "label smoothing of the cross-entropy")
    patience: int | None = _option(
        None,
        "early stopping: epochs without validation improvement (default: "
        f"{FIXED_CHOICES['patience']}; under --strategy auto with --budget, the epochs of the "
        "schedule auto sized, which then runs to its end)",
    )
    monitor: Monitor = _option(
        "auto",
        "the validation metric that picks best.ckpt and stops early (single-label: acc, "
        "balanced_acc, macro_f1; multi-label: map, macro_f1, micro_f1, exact_match); auto: map "
        f"for multi-label, balanced_acc for single-label data whose largest training class has "
        f"more than {BALANCED_MONITOR_ABOVE_RATIO:g} times the images of its smallest, else acc",
    )
    class_weights: ClassWeights = _option(
        "none",
        "balanced: weight each class in the loss by images / (classes x its images); "
        "multi-label: each class's positives by its negatives / positives",
    )
    sampling: Sampling = _option(
        "shuffle",
        "training order: shuffle (each image once per epoch) or balanced (images drawn with "
        "replacement, every class about equally often; the epoch keeps its length)",
    )
    layer_decay: float = _option(
        1.0,
        "layer-wise learning-rate decay (timm's layer groups): the backbone's last group trains "
        "at lr x backbone-lr-scale, each earlier group this factor lower (1: no decay)",
    )
    ema: bool = _option(
        False,
        "exponential moving average of the weights: validated, chosen and saved in their place",
    )
    # timm's train.py ceiling (--model-ema-decay 0.9998). tlkit's runs are short (a few hundred
    # to ~10k optimiser steps), so the EMA warms up as timm's ModelEmaV3(use_warmup=True) does:
    # decay 1 - (1 + t)^(-2/3) at update t, an averaging horizon of t^(2/3) updates (53 of a
    # 390-step run, 413 of 8,400). A fixed 0.9998 would still hold 92% of the first steps'
    # weights (the untrained head) after 400 steps; the ceiling binds only after 354k updates.
    ema_decay: float = _option(
        0.9998, "EMA decay ceiling, reached after a warm-up of (1 - decay)^-1.5 updates"
    )
    soup: int = _option(
        1,
        "greedy soup: after training, average best.ckpt's weights with those of the next-best "
        "epochs on validation, best first, each kept only where the monitored validation score "
        "does not drop; at most this many checkpoints (AutoGluon's default: 3; 1: best.ckpt "
        "alone; not with --ema, the features strategy or FSDP)",
    )

    # Data and augmentation
    img_size: int | None = _option(
        None,
        "square input size S; augmentation sizes scale with it"
        + AUTO_HELP.format("the backbone's pretrained input size, from timm's pretrained config"),
    )
    augment: bool | None = _option(
        None, "train augmentation: scale crops, horizontal flip, jitter" + AUTO_HELP.format("on")
    )
    short_side_min: int | None = _option(
        None,
        "scale augmentation: shortest resized side, given for 224px inputs (scales with S)"
        + AUTO_HELP.format(256),
    )
    short_side_max: int | None = _option(
        None, "scale augmentation: longest resized short side, at 224px" + AUTO_HELP.format(480)
    )
    hflip: float = _option(0.5, "probability of a horizontal flip (0 for text, digits)")
    color_jitter: float | None = _option(
        None,
        "brightness/contrast/saturation jitter strength (0: off)" + AUTO_HELP.format(0.4),
    )
    val_fraction: float = _option(0.1, "share of the training images held out for validation")
    test_fraction: float = _option(
        0.1,
        "share of the training images held out as a test split, where the data has no test/ "
        "folder: evaluated once, at the end, for an honest estimate (0: none; the only score "
        "is then the validation score that also chose the model)",
    )
    max_image_pixels: int = _option(
        89_478_485, "images with more pixels are skipped as decompression bombs (Pillow's limit)"
    )
    verify: Verify = _option(
        "full",
        "what the scan checks of every image before training, once per file (a cached index "
        "remembers it): full (decode; finds every broken file), header (format, size and "
        "--max-image-pixels only; a truncated file is skipped when it fails to load) or none "
        "(list only; broken files are skipped when they fail to load)",
    )
    scan_cache: str = _option(
        "",
        "folder of the scan indexes, one per data folder or CSV (default: $TLKIT_CACHE/scan, "
        "else $XDG_CACHE_HOME/tlkit/scan, else ~/.cache/tlkit/scan)",
    )
    csv_paths_outside_root: bool = _option(
        False, "allow CSV rows whose paths leave the CSV's folder"
    )
    num_workers: int = _option(-1, "data loader processes (-1: one per CPU core, at most 8)")

    # Test-time averaging
    choose_tta: bool = _option(
        True,
        "after training, evaluate the best checkpoint on the validation split (at most "
        f"{TTA_CHOICE_MAX_IMAGES:,} images) with each test-time averaging preset that suits it, "
        "and record the one --tta auto uses: the cheapest unless a costlier one is clearly "
        "better",
    )

    # Hardware, distribution and reproducibility
    accelerator: str = _option("auto", "auto, cpu or gpu")
    devices: str = _option("1", "devices per node: a number, 'auto' or a list such as '0,1'")
    num_nodes: int = _option(1, "machines (nodes) taking part; launch with torchrun or SLURM")
    dist_strategy: DistStrategy = _option(
        "auto", "Lightning strategy: auto, ddp or fsdp (with several devices)"
    )
    precision: Precision | None = _option(
        None,
        "32, 16-mixed (GPU) or bf16-mixed (default: 32 on a CPU; on one CUDA device, with "
        "--channels-last not given either, the fastest of 32 (either layout) and bf16-mixed "
        "(else 16-mixed; channels-last), timed at the run's input size and batch; on "
        "several, bf16-mixed, else 16-mixed)",
    )
    sync_batchnorm: bool = _option(False, "synchronise BatchNorm statistics across processes")
    channels_last: bool | None = _option(
        None,
        "channels-last (NHWC) memory format for the model and its input batches, faster "
        "convolutions on CPUs and most GPU runs (default: on; on one CUDA device, with "
        "--precision not given either, measured with it: tlkit.train.device_settings)",
    )
    accumulate_grad_batches: int = _option(1, "batches whose gradients make one optimiser step")
    scale_lr: bool = _option(
        False, "multiply --lr by processes x accumulation (linear scaling rule for big batches)"
    )
    seed: int = _option(0, "seed for splits, initialisation, augmentation and data order")

    def __post_init__(self) -> None:
        if self.strategy != "auto":  # a named strategy: what is not given takes its fixed value
            for name, value in FIXED_CHOICES.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
            if self.img_size is None:
                from tlkit.model.backbones import (
                    preprocessing,  # timm, only when a size is to be found
                )

                self.img_size = preprocessing(self.backbone).input_size
        for name, kind in typing.get_type_hints(type(self)).items():
            allowed = typing.get_args(kind) if typing.get_origin(kind) is Literal else ()
            if allowed and getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}")
        checks = {
            "epochs": self.epochs is None or self.epochs >= 1,
            "patience": self.patience is None or self.patience >= 0,
            "epoch_batches": self.epoch_batches >= 0,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "img_size": self.img_size is None or self.img_size >= 16,
            "val_fraction": 0 < self.val_fraction < 1,
            "test_fraction": 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1,
            "dropout": 0 <= self.dropout < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "hflip": 0 <= self.hflip <= 1,
            "max_image_pixels": self.max_image_pixels >= 1,
            "unfreeze_stages": self.unfreeze_stages is None or self.unfreeze_stages >= 1,
            "num_nodes": self.num_nodes >= 1,
            "accumulate_grad_batches": self.accumulate_grad_batches >= 1,
            "backbone_lr_scale": self.backbone_lr_scale is None or self.backbone_lr_scale >= 0,
            "layer_decay": 0 < self.layer_decay <= 1,
            "ema_decay": 0 < self.ema_decay < 1,
            "soup": self.soup >= 1,
        }
        if self.budget:
            parse_duration(self.budget)  # a ConfigError naming the format
        invalid = [name for name, valid in checks.items() if not valid]
        if invalid:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in invalid)
            raise ConfigError(f"invalid config values: {values}")
        if self.ema and self.dist_strategy == "fsdp":
            raise ConfigError(
                "--ema keeps a full copy of the model on every process, which FSDP's sharding "
                "rules out: use --dist-strategy ddp (or no --ema)"
            )

    def to_yaml(self, explain_open: bool = False) -> str:
        """The configuration as YAML that `--config` reads back; `explain_open` adds a comment
        to each value that is chosen when the run starts (`open_fields`), saying by what."""
        text = yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)
        if not explain_open:
            return text
        open_fields = self.open_fields()
        lines = []
        for line in text.splitlines():
            name = line.split(":", 1)[0]
            lines.append(f"{line}  # {open_fields[name]}" if name in open_fields else line)
        return "\n".join(lines) + "\n"

    def open_fields(self) -> dict[str, str]:
        """The fields whose value is chosen when the run starts, and by what: those
        `--strategy auto` chooses from measurements (`choices_left_to_auto`; with the epochs,
        the epoch length), and the precision and memory format, by the device."""
        chosen = {name: "chosen by --strategy auto" for name in self.choices_left_to_auto()}
        if self.strategy == "auto" and self.epochs is None:
            chosen["epoch_batches"] = "set by --strategy auto with the epochs"
        for name, explanation in DEVICE_DEFAULTS.items():
            if getattr(self, name) is None:
                chosen[name] = explanation
        return chosen

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def field_default(cls, name: str) -> Any:
        """The default of the field `name` where nothing is measured (the API's defaults): the
        field's own, or for a field `--strategy auto` chooses, its fixed value."""
        return FIXED_CHOICES.get(name, cls.__dataclass_fields__[name].default)

    def choices_left_to_auto(self) -> list[str]:
        """The fields `--strategy auto` is to choose: those not given (still None)."""
        return [name for name in FIXED_CHOICES if getattr(self, name) is None]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Build a config, rejecting unknown keys by name so a typo is never ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{key: coerce_value(key, value, hints[key]) for key, value in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> FinetuneConfig:
        return cls.from_dict(read_yaml_mapping(path, "config keys"))


def parse_duration(text: str) -> float:
    """Seconds of a duration such as `90s`, `10m`, `2h`, `1h30m` or `1.5h` (a plain number is
    seconds)."""
    match = DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None:
        raise ConfigError(f"budget {text!r} is not a duration such as 90s, 10m, 2h or 1h30m")
    hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"budget {text!r} must be longer than zero")
    return total


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def read_yaml_mapping(path: str | Path, of_what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty for an empty file); a missing file, invalid YAML
    or another kind of document is a `ConfigError` naming the file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of {of_what}")
    return loaded


def config_kwargs(config: FinetuneConfig, target: Callable[..., Any]) -> dict[str, Any]:
    """The config's values of the fields `target` takes a parameter of, by name (the idea of
    fastai's `@delegates` and LightningCLI): a field added to both is passed on without being
    copied by hand. A class whose `__init__` passes `**options` on to its base class takes
    the base's parameters too."""
    parameters = accepted_parameters(target)
    return {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name in parameters
    }


def accepted_parameters(target: Callable[..., Any]) -> set[str]:
    """The names of the parameters `target` takes; for a class, those of its `__init__` and,
    while that ends in `**options`, of the base classes' it passes them on to."""
    if not inspect.isclass(target):
        return set(inspect.signature(target).parameters)
    names: set[str] = set()
    for owner in target.__mro__:
        if "__init__" not in vars(owner):
            continue
        parameters = inspect.signature(owner.__init__).parameters.values()
        names |= {parameter.name for parameter in parameters if parameter.kind not in _VARIADIC}
        if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
            break
    return names - {"self"}


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
