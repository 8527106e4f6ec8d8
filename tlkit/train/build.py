"""Builders: a config -> its data module, its model, and the checks that need neither data nor
training.

`build_model` and `build_datamodule` pass the config's fields on by parameter name
(`config.config_kwargs`), so neither copies a field by hand. Training (`finetune`), auto's
measurements (`auto`) and the sanity checks all build through here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tlkit.config import FinetuneConfig, config_kwargs
from tlkit.data.augment import relative_short_sides, train_transform
from tlkit.data.datamodule import BaseImageDataModule, ImageDataModule
from tlkit.data.shards import ShardDataModule, open_converted
from tlkit.errors import ConfigError
from tlkit.model.backbones import create_backbone, preprocessing
from tlkit.model.classifier import TransferClassifier
from tlkit.model.strategies import trainable_parameter_names
from tlkit.model.tasks import CLASS_WEIGHTS, resolve_monitor, task_of
from tlkit.runfolder import DataFacts


def build_model(config: FinetuneConfig, data: DataFacts) -> TransferClassifier:
    """The LightningModule a config describes, for the data `data` describes (classes, task,
    class counts for `--class-weights`, horizontal flips)."""
    options = config_kwargs(config, TransferClassifier) | {
        "num_classes": len(data.classes),
        "class_names": list(data.classes),
        "task": data.label_kind,
        "trained_with_hflip": data.trained_with_hflip,
        "trained_short_sides": list(trained_short_sides(config)),  # a list: plain hparams.yaml
        "loss_weights": class_loss_weights(config, data),
        "initial_bias": initial_bias(config, data),
    }
    return TransferClassifier(**options)


def initial_bias(config: FinetuneConfig, data: DataFacts) -> list[float] | None:
    """The head's initial bias for the data's task from its training class counts; None (zero)
    where they are not known, where the task starts at zero, or where `--class-weights` or
    `--sampling balanced` reweigh the classes (the reweighted loss is lowest at equal odds)."""
    counts = data.images_per_class.get("train")
    if not counts or config.class_weights != "none" or config.sampling != "shuffle":
        return None
    return task_of(data.label_kind).initial_bias(counts, data.split_images.get("train", 0))


def data_facts(config: FinetuneConfig, images: BaseImageDataModule) -> DataFacts:
    """What the set-up data module's data says, with whether this config's training shows the
    model mirror images."""
    return images.data_facts(trains_with_hflip(config))


def class_loss_weights(config: FinetuneConfig, data: DataFacts) -> list[float] | None:
    """The per-class loss weights `--class-weights` asks for, from the training class counts."""
    counts = data.images_per_class.get("train")
    if config.class_weights != "none" and not counts:
        raise ConfigError(f"--class-weights {config.class_weights} needs the training class counts")
    if config.class_weights not in CLASS_WEIGHTS:
        raise ConfigError(f"unknown class weights '{config.class_weights}'")
    weigh = CLASS_WEIGHTS[config.class_weights]
    return weigh(task_of(data.label_kind), counts or [], data.split_images.get("train", 0))


def augmentation_options(config: FinetuneConfig) -> dict[str, Any]:
    """`augment.train_transform`'s keyword arguments (its scale range is two config fields)."""
    return {
        "short_side_range": (config.short_side_min, config.short_side_max),
        "hflip": config.hflip,
        "color_jitter": config.color_jitter,
    }


def trains_on_augmented_images(config: FinetuneConfig) -> bool:
    """Whether the model trains on the train augmentation's views: with augmentation on, unless
    the `features` strategy trains its head on one plain cached view per image."""
    plain_cache = (
        config.strategy == "features" and config.cache and config.cache_augmented_views == 0
    )
    return bool(config.augment) and not plain_cache


def trains_with_hflip(config: FinetuneConfig) -> bool:
    """Whether the model sees mirror images in training: the train augmentation flips."""
    return trains_on_augmented_images(config) and config.hflip > 0


def trained_short_sides(config: FinetuneConfig) -> tuple[float, float]:
    """The short sides training resizes images to, relative to the input size: the scale
    augmentation's range, or without augmentation the evaluation resize (S / crop_pct) alone."""
    if trains_on_augmented_images(config):
        return relative_short_sides((config.short_side_min, config.short_side_max))
    evaluation = 1 / preprocessing(config.backbone).crop_pct
    return evaluation, evaluation


def provisional_strategy(config: FinetuneConfig) -> str:
    """For checks before `--strategy auto` has measured: partial where --unfreeze-stages is
    given (auto then trains those stages), else full, which every layer group takes part in."""
    return "partial" if config.unfreeze_stages is not None else "full"


def check_config(config: FinetuneConfig) -> None:
    """Configuration errors that need the backbone but no data, raised before the data scan
    (which can take minutes): the model at this size, the stage count, the scale range, the
    logger's package. With
    `--strategy auto`, of its provisional strategy and the open choices' fixed values."""
    if config.strategy == "auto":
        config = replace(config, strategy=provisional_strategy(config))
    try:
        with torch.device("meta"):  # the architecture only: no memory, no weights
            backbone = create_backbone(
                config.backbone, "none", config.drop_path_rate, config.img_size
            )
    except TypeError as error:  # timm hands options a model does not take to its class
        raise ConfigError(f"{config.backbone} cannot be built as configured: {error}") from error
    trainable_parameter_names(backbone, config.strategy, config.unfreeze_stages)
    if config.task != "auto":  # a monitored metric the task does not log
        resolve_monitor(config.task, config.monitor, None)
    if config.lp_ft and config.strategy == "features":
        raise ConfigError(
            "--lp-ft starts partial or full fine-tuning from a linear probe; the features "
            "strategy trains that linear head itself"
        )
    if config.lp_ft and config.head_hidden > 0:
        raise ConfigError(
            "--lp-ft initialises the classifier from a linear probe of the pooled features, "
            "which a head with a hidden layer (--head-hidden) does not see: use one or the other"
        )
    if config.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--logger tensorboard needs the tensorboard package: "
            "pip install tensorboard (or tlkit[tensorboard])"
        )
    if config.augment:
        train_transform(
            preprocessing(config.backbone, config.img_size), **augmentation_options(config)
        )


def build_datamodule(
    config: FinetuneConfig,
    recorded_split: dict[str, str] | None = None,
    load_failure_log: Path | None = None,
) -> BaseImageDataModule:
    """The data module a config describes, with the backbone's own preprocessing (and the
    `ImageDataModule` options `recorded_split` and `load_failure_log`): a `ShardDataModule`
    for a dataset converted by `tlkit convert` (found by its marker file), else an
    `ImageDataModule` for an image folder or CSV. The one place that tells them apart."""
    if open_converted(config.data_dir) is not None:
        kind, options = ShardDataModule, {"chunk_cache_dir": cache_folder(config) / "shards"}
    else:
        kind, options = ImageDataModule, {}
    return kind(
        preprocessing=preprocessing(config.backbone, config.img_size),
        augmentation=augmentation_options(config),
        recorded_split=recorded_split,
        load_failure_log=load_failure_log,
        **options,
        **config_kwargs(config, kind),
    )


def cache_folder(config: FinetuneConfig) -> Path:
    """--cache-dir, else OUT/cache: cached features (features strategy) and, in shards/, the
    chunks LitData downloads from an object store."""
    return Path(config.cache_dir or Path(config.out) / "cache")
