"""Each fact has one home: defaults in FinetuneConfig, named choices in one table each, image
discovery and preprocessing in one function each."""

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import write_colour_images

from tlkit.cli import build_parser
from tlkit.commands.report import TASK_REPORTS
from tlkit.commands.search import SAMPLERS
from tlkit.config import (
    ClassWeights,
    FinetuneConfig,
    Monitor,
    Optimizer,
    Sampling,
    Strategy,
    Task,
    TaskChoice,
    TrainingStrategy,
    Verify,
    config_kwargs,
)
from tlkit.data.augment import train_transform
from tlkit.data.datamodule import BaseImageDataModule, ImageDataModule
from tlkit.data.datasets import TRAINING_SAMPLERS
from tlkit.data.labels import LABEL_KINDS
from tlkit.data.shards import ShardDataModule
from tlkit.data.sources import VERIFY_MODES, find_images, scan_folder
from tlkit.infer import export as export_module
from tlkit.infer.export import FORMATS
from tlkit.infer.predict import image_paths, single_device_trainer
from tlkit.infer.tta import PRESETS
from tlkit.model.classifier import OPTIMIZERS, TransferClassifier
from tlkit.model.strategies import STRATEGIES
from tlkit.model.tasks import CLASS_WEIGHTS, TASKS
from tlkit.runfolder import DataFacts, Preprocessing
from tlkit.train.build import build_datamodule, build_model, trains_with_hflip

# The API's defaults: for the choices `--strategy auto` makes, their fixed values
CONFIG_DEFAULTS = {
    field.name: FinetuneConfig.field_default(field.name)
    for field in dataclasses.fields(FinetuneConfig)
}
# The hyperparameters every tlkit checkpoint records (save_hyperparameters): loading an older
# checkpoint passes them back to TransferClassifier by these names.
CHECKPOINT_HPARAMS = {
    "num_classes",
    "backbone",
    "pretrained",
    "strategy",
    "unfreeze_stages",
    "backbone_lr_scale",
    "dropout",
    "head_hidden",
    "drop_path_rate",
    "lr",
    "weight_decay",
    "optimizer",
    "warmup_epochs",
    "label_smoothing",
    "layer_decay",
    "img_size",
    "class_names",
    "channels_last",
    "trained_with_hflip",
    "trained_short_sides",
}
# Added since; checkpoints without them load with their defaults (single-label, unweighted,
# the head's bias starting at zero: it is in the state dict anyway).
ADDED_HPARAMS = {"task", "loss_weights", "initial_bias"}


# train_transform's `seed` seeds its albumentations pipeline, not the run: a different meaning;
# the model's `task` is the resolved one (the data's kind), the config's may be `auto`.
@pytest.mark.parametrize(
    "target, other_meaning",
    [
        (TransferClassifier, ("task",)),
        (ImageDataModule, ()),
        (BaseImageDataModule, ()),
        (ShardDataModule, ()),
        (train_transform, ("seed",)),
    ],
)
def test_parameters_named_like_config_fields_default_to_the_configs_values(target, other_meaning):
    for name, parameter in inspect.signature(target).parameters.items():
        if name in CONFIG_DEFAULTS and name not in other_meaning:
            if parameter.default is not inspect.Parameter.empty:
                assert parameter.default == CONFIG_DEFAULTS[name], name


def test_scale_range_defaults_to_the_configs():
    default = inspect.signature(train_transform).parameters["short_side_range"].default
    assert default == (CONFIG_DEFAULTS["short_side_min"], CONFIG_DEFAULTS["short_side_max"])


def test_config_kwargs_picks_the_fields_a_callable_names():
    config = FinetuneConfig(backbone="test_resnet", img_size=32, lr=0.02, seed=3)

    def target(lr, seed, unrelated=None): ...

    assert config_kwargs(config, target) == {"lr": 0.02, "seed": 3}


def test_build_model_and_datamodule_pass_every_config_field_they_take(tmp_path):
    config = FinetuneConfig(
        data_dir=str(tmp_path),
        backbone="test_resnet",
        pretrained="none",
        strategy="partial",
        img_size=32,
        dropout=0.25,
        lr=0.02,
        optimizer="sgd",
        warmup_epochs=0.5,
        channels_last=True,
        batch_size=5,
        num_workers=0,
        val_fraction=0.3,
        seed=7,
        max_image_pixels=1000,
        hflip=0.0,
    )
    model = build_model(config, DataFacts(["a", "b"], trained_with_hflip=trains_with_hflip(config)))
    assert set(model.hparams) == CHECKPOINT_HPARAMS | ADDED_HPARAMS
    for name in CHECKPOINT_HPARAMS & CONFIG_DEFAULTS.keys():
        assert model.hparams[name] == getattr(config, name), name
    assert model.hparams.trained_with_hflip is False
    data = build_datamodule(config)
    assert (data.batch_size, data.num_workers, data.val_fraction, data.seed) == (5, 0, 0.3, 7)
    assert data.max_image_pixels == 1000
    assert data.augmentation == {"short_side_range": (256, 480), "hflip": 0.0, "color_jitter": 0.4}


def test_a_checkpoint_holding_the_recorded_hyperparameters_loads_with_weights_only(tmp_path):
    model = TransferClassifier(2, "test_resnet", "none", img_size=32, class_names=["a", "b"])
    path = tmp_path / "old.ckpt"
    hparams = {name: model.hparams[name] for name in CHECKPOINT_HPARAMS}
    checkpoint = {
        "pytorch-lightning_version": pl.__version__,
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
    }
    torch.save(checkpoint, path)
    loaded = TransferClassifier.load_checkpoint(path)
    assert loaded.class_names == ["a", "b"]
    assert torch.equal(loaded.head.classifier.weight, model.head.classifier.weight)
    assert loaded.task.name == "single-label" and loaded.class_loss_weights is None


def _choices(parser, command: str, flag: str) -> list[str]:
    subparsers = next(a for a in parser._actions if a.dest == "command")
    action = next(a for a in subparsers.choices[command]._actions if flag in a.option_strings)
    return list(action.choices)


def test_named_choices_come_from_their_tables():
    """The config's Literal choices equal the tables' keys, and the CLI offers the keys."""
    parser = build_parser()
    assert list(STRATEGIES) == list(typing.get_args(TrainingStrategy))
    assert list(typing.get_args(Strategy)) == ["auto", *STRATEGIES]
    assert list(OPTIMIZERS) == list(typing.get_args(Optimizer))
    assert _choices(parser, "finetune", "--strategy") == ["auto", *STRATEGIES]
    assert _choices(parser, "finetune", "--optimizer") == list(OPTIMIZERS)
    assert _choices(parser, "search", "--sampler") == list(SAMPLERS)
    assert _choices(parser, "export", "--format") == list(FORMATS)
    for command in ("evaluate", "predict", "report"):
        assert _choices(parser, command, "--tta") == [*PRESETS, "auto"]
    assert list(VERIFY_MODES) == list(typing.get_args(Verify))
    for command in ("finetune", "sanity", "search", "evaluate", "report"):
        assert _choices(parser, command, "--verify") == list(VERIFY_MODES)
    assert list(TASKS) == list(LABEL_KINDS) == list(TASK_REPORTS) == list(typing.get_args(Task))
    assert all(TASKS[name].labels is LABEL_KINDS[name] for name in TASKS)
    assert list(typing.get_args(TaskChoice)) == ["auto", *TASKS]
    assert _choices(parser, "finetune", "--task") == ["auto", *TASKS]
    monitorable = [name for task in TASKS.values() for name in task.monitorable]
    assert set(typing.get_args(Monitor)) == {"auto", *monitorable}
    assert list(CLASS_WEIGHTS) == list(typing.get_args(ClassWeights))
    assert list(TRAINING_SAMPLERS) == list(typing.get_args(Sampling))
    assert _choices(parser, "finetune", "--sampling") == list(TRAINING_SAMPLERS)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_of_the_table_builds(name):
    model = TransferClassifier(2, "test_resnet", "none", img_size=32, optimizer=name)
    optimizer, _ = model.optimizer_and_schedule(total_steps=10, steps_per_epoch=5)
    assert isinstance(optimizer, torch.optim.Optimizer)
    unknown = TransferClassifier(2, "test_resnet", "none", img_size=32, optimizer="lamb")
    with pytest.raises(ValueError, match="choose one of adamw, sgd"):
        unknown.optimizer_and_schedule(total_steps=10, steps_per_epoch=5)


def test_training_prediction_and_export_find_the_same_images(tmp_path):
    """One discovery (data.find_images): hidden entries and non-images left out, a linked
    folder followed once, a link loop cut, in the same order for training, predict and export."""
    data = tmp_path / "data"
    write_colour_images(data, per_class=2, seed=0, size=16)
    elsewhere = tmp_path / "elsewhere"
    write_colour_images(elsewhere, per_class=1, seed=1, size=16)
    (data / "red" / "more").symlink_to(elsewhere / "red", target_is_directory=True)
    (data / "red" / "loop").symlink_to(data / "red", target_is_directory=True)
    (data / "red" / "notes.txt").write_text("not an image")
    (data / "red" / ".hidden.png").write_bytes(b"")

    images, skipped, other_files = find_images(data / "red")
    assert [Path(path).relative_to(data / "red").as_posix() for path in images] == [
        "000.jpg",
        "001.png",
        "more/000.jpg",
    ]
    assert skipped == [] and other_files.counts() == ({".txt": 1}, {})  # counted, not skipped
    assert image_paths([data / "red"])[0] == images
    assert [path for path, label in scan_folder(data).samples if label == 2] == images
    assert sorted(export_module._images_by_class(data / "red", 8)) == sorted(images)


def test_preprocessing_is_read_back_from_its_record():
    preprocessing = Preprocessing(32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "bicubic", 0.875)
    card_entry = {**dataclasses.asdict(preprocessing), "resize_short_side": 37, "steps": "..."}
    assert Preprocessing.from_dict(card_entry) == preprocessing


def test_evaluation_trainer_runs_on_one_device_and_writes_nothing():
    trainer = single_device_trainer("cpu", progress=False, max_steps=3)
    assert (trainer.num_devices, trainer.logger, trainer.checkpoint_callback) == (1, None, None)
    assert trainer.progress_bar_callback is None and trainer.max_steps == 3
