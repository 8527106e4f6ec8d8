"""Sanity checks before spending compute: the lecture's checklist, run on the user's own data.

1. Loss at initialisation: the new head's classifier starts at zero, so every logit is 0 and the
   mean cross-entropy is ln(C) (2.30 for 10 classes); a multi-label task's sigmoids start at
   each label's training rate (zero weights, the bias at the label's log-odds: the task's
   `initial_bias`), so the binary cross-entropy is that of those rates. Far from the loss of
   that constant prediction, the head's scale is off.
2. Overfit a tiny subset: 20 images per class, augmentation and regularisation off (dropout,
   weight decay, label smoothing, drop-path 0); the model must fit them (>= 99% accuracy;
   multi-label: exact match, the task's `fit_metric`) within a step budget. If it cannot,
   something between data, labels, model and optimiser is broken.
3. Activation statistics: mean and std of the output of every backbone stage and of the head,
   recorded with forward hooks and reported like the lecture (`hidden layer 3 had mean ... and
   std ...`); layers whose std collapses towards 0 (vanishing), blows up (exploding) or whose
   values pile up at their extreme (saturating, like tanh at +-1 or ReLU6 at 6) are flagged.
4. Gradient flow: one backward pass; every parameter the transfer strategy trains gets a finite,
   non-zero gradient, and no parameter it freezes gets one. The head's classifier starts at zero
   (heads.py), which passes no gradient below it before its first update, so the check measures
   after one first-update-sized step of the classifier (then puts its weights back).

`run_sanity_checks(config)` runs all four on a config's data and model; the single checks take a
`TransferClassifier` and data, so they work on any model built by hand too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from tlkit.choices import SANITY_OVERFIT_STEPS, SANITY_SAMPLES_PER_CLASS
from tlkit.config import FinetuneConfig
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data.augment import eval_transform
from tlkit.data.datasets import ImageDataset, LabelledImages, worker_start_context
from tlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS
from tlkit.data.labels import Label, label_indices
from tlkit.errors import ConfigError
from tlkit.infer.predict import single_device_trainer
from tlkit.metrics import TITLES, logged_name
from tlkit.model.backbones import layer_groups
from tlkit.model.classifier import TransferClassifier
from tlkit.model.strategies import trainable_parameter_names
from tlkit.runfolder import Preprocessing
from tlkit.train.build import (
    build_datamodule,
    build_model,
    check_config,
    data_facts,
    provisional_strategy,
)
from tlkit.train.hardware import device_defaults

logger = logging.getLogger(__name__)

SAMPLES_PER_CLASS = SANITY_SAMPLES_PER_CLASS
OVERFIT_STEPS = SANITY_OVERFIT_STEPS
OVERFIT_TARGET = 0.99
INIT_LOSS_TOLERANCE = 0.1  # relative to the expected loss (ln C for a zero head)
INIT_LOSS_BATCHES = 4
# The gradient-flow check first moves the zero-initialised classifier by this much per weight, in
# the direction of its gradient's sign: AdamW's first update at the default learning rate.
FIRST_UPDATE_SIZE = 1e-3
# A layer is vanishing (exploding) when its std is below (above) this multiple of the network
# input's std.
VANISHING_STD_RATIO = 1e-2
EXPLODING_STD_RATIO = 1e3
# A layer is saturating when more than this share of its values lies within 1% of its largest
# magnitude: a healthy, spread-out distribution has almost none there, a saturated tanh most.
SATURATED_SHARE = 0.5
SATURATION_BAND = 0.01


@dataclass
class CheckResult:
    """The outcome of one check: its name, PASS/FAIL, the numbers behind it in one line, and
    any lines of detail (the activation statistics' per-layer lines)."""

    name: str
    passed: bool
    summary: str
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.summary}"


def report_lines(results: list[CheckResult]) -> list[str]:
    """The checks' report as `tlkit sanity` prints it: each check's details and its PASS/FAIL
    line, then how many passed."""
    lines = [line for result in results for line in (*result.details, str(result))]
    passed = sum(result.passed for result in results)
    return [*lines, f"Sanity checks: {passed} of {len(results)} passed"]


# ---------------------------------------------------------------------------------------------
# Data for the checks


def balanced_subset(
    samples: list[tuple[str, Label]], per_class: int, seed: int
) -> list[tuple[str, Label]]:
    """`per_class` samples of every class (all of a smaller class), drawn at random, seeded; a
    multi-label image drawn for one of its classes counts once."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[str, Label]]] = {}
    for sample in samples:
        for index in label_indices(sample[1]):
            by_class.setdefault(index, []).append(sample)
    chosen: dict[str, tuple[str, Label]] = {}
    for label in sorted(by_class):
        members = by_class[label]
        picks = rng.permutation(len(members))[:per_class]
        chosen |= {members[index][0]: members[index] for index in sorted(picks)}
    return list(chosen.values())


def subset_loader(
    samples: list[tuple[str, Label]],
    preprocessing: Preprocessing,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    source: LabelledImages | None = None,
    collate: Callable | None = None,
) -> DataLoader:
    """Batches of the samples with the evaluation transform: no augmentation. `source` is the
    dataset the samples were taken from, which reads them (a converted dataset's shards); by
    default they are image files. `collate`: the data module's (`collator()`), which batches
    labels as the task's targets; by default single-label class indices."""
    transform = eval_transform(preprocessing)
    images = (
        source.images_of(samples, transform)
        if source is not None
        else ImageDataset(samples, transform, max_pixels)
    )
    return DataLoader(
        images,
        batch_size=min(batch_size, len(samples)),
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_start_context(num_workers),
        collate_fn=collate,
    )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# 1. Loss at initialisation


def check_loss_at_init(
    model: TransferClassifier,
    loader: DataLoader,
    batches: int = INIT_LOSS_BATCHES,
    tolerance: float = INIT_LOSS_TOLERANCE,
) -> CheckResult:
    """Mean loss (the task's) of the untrained model over a few batches against the loss of
    the constant prediction its head starts from (every logit its classifier's bias): ln(C)
    for a zero bias, or for sigmoids each label's training rate (the task's `initial_bias`).

    Passes when |measured - expected| <= tolerance * expected. Measured in eval mode (no
    dropout), without label smoothing and class weights.
    """
    what = model.task.loss_at_init(model.hparams.num_classes)
    device = _device_of(model)
    bias = model.head.classifier.bias.detach()
    model.eval()
    total, constant, count = 0.0, 0.0, 0
    with torch.no_grad():
        for images, labels in islice(loader, batches):
            labels = labels.to(device)
            logits = model(images.to(device))
            total += model.loss(logits, labels, training=False).item() * len(labels)
            start = bias.expand(len(labels), -1)
            constant += model.loss(start, labels, training=False).item() * len(labels)
            count += len(labels)
    measured, expected = total / count, constant / count
    passed = abs(measured - expected) <= tolerance * expected
    summary = (
        f"{measured:.4f} measured on {count} images, {expected:.4f} expected ({what}),"
        f" tolerance {tolerance * expected:.4f}"
    )
    if not passed:
        summary += "; the head's initial scale is off (the logits should start at its bias)"
    return CheckResult("loss at init", passed, summary)


# ---------------------------------------------------------------------------------------------
# 2. Overfit a tiny subset


class _OverfitProgress(pl.Callback):
    """Prints one line per epoch and stops training once the subset is fitted.

    The score (`metric`, logged by the model's validation) is measured on the subset in eval
    mode after each epoch (Lightning's validation loop run on the training images), so it is
    the score of the weights, not a running average over a changing model.
    """

    def __init__(self, target: float, max_steps: int, metric: str) -> None:
        self.target = target
        self.max_steps = max_steps
        self.metric = metric
        self.title = TITLES.get(metric, metric)
        self.best_accuracy = 0.0
        self.steps_to_target: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        accuracy = float(metrics.get(logged_name("val", self.metric), float("nan")))
        loss = float(metrics.get("train_loss_epoch", float("nan")))
        self.best_accuracy = max(self.best_accuracy, accuracy)
        logger.info(
            f"Overfit epoch {trainer.current_epoch + 1}: step {trainer.global_step} / "
            f"{self.max_steps}, loss {loss:.4f}, train {self.title} {accuracy:.4f}"
        )
        if accuracy >= self.target and self.steps_to_target is None:
            self.steps_to_target = trainer.global_step
            trainer.should_stop = True


def check_overfit(
    model: TransferClassifier,
    samples: list[tuple[str, Label]],
    preprocessing: Preprocessing,
    batch_size: int,
    steps: int = OVERFIT_STEPS,
    target: float = OVERFIT_TARGET,
    accelerator: str = "auto",
    seed: int = 0,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    source: LabelledImages | None = None,
    collate: Callable | None = None,
) -> CheckResult:
    """Train `model` on `samples` alone (evaluation transform) for at most `steps` optimiser
    steps; pass when its score on them (the task's `fit_metric`: accuracy, or exact match)
    reaches `target`. `source` and `collate`: as for `subset_loader`.

    The model is trained as configured (its optimiser, learning rate and schedule); build it with
    regularisation off, as `run_sanity_checks` does.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    options = {
        "seed": seed,
        "num_workers": num_workers,
        "max_pixels": max_pixels,
        "source": source,
        "collate": collate,
    }
    train_loader = subset_loader(samples, preprocessing, batch_size, True, **options)
    eval_loader = subset_loader(samples, preprocessing, batch_size, False, **options)
    max_epochs = math.ceil(steps / len(train_loader))
    progress = _OverfitProgress(target, steps, model.task.fit_metric)
    trainer = single_device_trainer(
        accelerator,
        progress=False,
        max_steps=steps,
        max_epochs=max_epochs,
        callbacks=[progress],
        num_sanity_val_steps=0,
    )
    with expected_lightning_warnings_hidden():
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=eval_loader)
    classes = len({index for _, label in samples for index in label_indices(label)})
    where = f"{len(samples)} images of {classes} classes"
    if progress.steps_to_target is not None:
        summary = (
            f"train {progress.title} {progress.best_accuracy:.4f} >= {target} after "
            f"{progress.steps_to_target} steps (budget {steps}) on {where}"
        )
        return CheckResult("overfit a tiny subset", True, summary)
    summary = (
        f"train {progress.title} {progress.best_accuracy:.4f} < {target} after "
        f"{trainer.global_step} steps (budget {steps}) on {where}; check labels, learning rate "
        "and data"
    )
    return CheckResult("overfit a tiny subset", False, summary)


# ---------------------------------------------------------------------------------------------
# 3. Activation statistics


@dataclass
class LayerStatistics:
    """Mean and std of one layer's output, and whether it vanishes, explodes or saturates."""

    name: str
    mean: float
    std: float
    saturated_share: float
    vanishing: bool
    exploding: bool
    saturating: bool

    @property
    def flags(self) -> list[str]:
        flags = {
            "VANISHING": self.vanishing,
            "EXPLODING": self.exploding,
            "SATURATING": self.saturating,
        }
        return [flag for flag, on in flags.items() if on]


def layer_statistics(
    name: str, output: torch.Tensor, input_std: float, flag: bool = True
) -> LayerStatistics:
    """Statistics of one recorded output; `flag=False` records without judging (logits)."""
    values = output.detach().float().flatten()
    std = values.std().item()
    largest = values.abs().max().item()
    saturated_share = (
        (values.abs() >= (1 - SATURATION_BAND) * largest).float().mean().item()
        if largest > 0
        else 0.0
    )
    return LayerStatistics(
        name=name,
        mean=values.mean().item(),
        std=std,
        saturated_share=saturated_share,
        vanishing=flag and std < VANISHING_STD_RATIO * input_std,
        exploding=flag and std > EXPLODING_STD_RATIO * input_std,
        saturating=flag and saturated_share > SATURATED_SHARE,
    )


def describe(label: str, statistics: LayerStatistics) -> str:
    """The lecture's line: `hidden layer 3 had mean 0.012345 and std 0.456789`, plus flags."""
    line = f"{label} had mean {statistics.mean:.6f} and std {statistics.std:.6f}"
    return line + "".join(f"  <- {flag}" for flag in statistics.flags)


@contextmanager
def record_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that keep each named module's latest output while the block runs."""
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            outputs[name] = output.detach()

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def stage_modules(backbone: nn.Module) -> dict[str, nn.Module]:
    """One module per layer group (timm's stages, stem first): the group's deepest common
    module, or, when a group spans several top-level modules (a stem of conv + norm, the last
    stage with the final feature layers), the module holding its last parameter."""
    modules = dict(backbone.named_modules())
    stages: dict[str, nn.Module] = {}
    for group in layer_groups(backbone):
        owners = [name.rpartition(".")[0] for name in group]
        common = _common_prefix([owner.split(".") for owner in owners])
        name = ".".join(common) if common else next(o for o in reversed(owners) if o)
        stages[name] = modules[name]
    return stages


def _common_prefix(paths: list[list[str]]) -> list[str]:
    prefix: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return prefix


def check_activations(model: TransferClassifier, images: torch.Tensor) -> CheckResult:
    """Mean/std of every backbone stage's output and of the head on a batch, in eval mode.

    Fails if a hidden layer (a backbone stage, the head's hidden activation) vanishes, explodes
    or saturates. The logits are reported but not judged: near-zero logits at initialisation are
    deliberate, and their scale is what the loss-at-init check tests.
    """
    hidden = {f"backbone.{name}": module for name, module in stage_modules(model.backbone).items()}
    hidden.update(
        {
            f"head.layers.{index}": layer
            for index, layer in enumerate(model.head.layers)
            if _is_activation(layer)
        }
    )
    images = images.to(_device_of(model))
    model.eval()
    with torch.no_grad(), record_outputs({**hidden, "head": model.head}) as outputs:
        model(images)
    input_std = images.float().std().item()
    details = [describe("input", layer_statistics("input", images, input_std, flag=False))]
    flagged = []
    for index, name in enumerate(hidden, start=1):
        statistics = layer_statistics(name, outputs[name], input_std)
        details.append(describe(f"hidden layer {index} ({name})", statistics))
        if statistics.flags:
            flagged.append(f"layer {index} ({name}) {'/'.join(statistics.flags).lower()}")
    logits = layer_statistics("logits", outputs["head"], 1.0, flag=False)
    details.append(describe("head logits", logits))
    if flagged:
        return CheckResult("activation statistics", False, "; ".join(flagged), details)
    summary = (
        f"{len(hidden)} hidden layers on {len(images)} images, none vanishing or exploding "
        f"(std below {VANISHING_STD_RATIO:g} or above {EXPLODING_STD_RATIO:g} x input std) or "
        f"saturating (over {SATURATED_SHARE:.0%} of values at the extreme)"
    )
    return CheckResult("activation statistics", True, summary, details)


def _is_activation(module: nn.Module) -> bool:
    """A parameter-free layer other than dropout: the head's nonlinearity."""
    return not any(True for _ in module.parameters()) and not isinstance(module, nn.Dropout)


# ---------------------------------------------------------------------------------------------
# 4. Gradient flow


def intended_trainable(model: TransferClassifier) -> set[str]:
    """Parameter names the model's transfer strategy trains: its backbone groups and the head."""
    hp = model.hparams
    backbone = trainable_parameter_names(model.backbone, hp.strategy, hp.unfreeze_stages)
    head = {name for name, _ in model.head.named_parameters()}
    return {f"backbone.{name}" for name in backbone} | {f"head.{name}" for name in head}


def check_gradient_flow(
    model: TransferClassifier, images: torch.Tensor, labels: torch.Tensor
) -> CheckResult:
    """One forward/backward pass in train mode: every parameter the strategy trains must get a
    finite, non-zero gradient; every parameter it freezes must get none.

    Measured after the classifier's first update (`after_first_classifier_update`): a zero
    classifier, as initialised, passes no gradient to the layers below it.
    """
    device = _device_of(model)
    images, labels = images.to(device), labels.to(device)
    trainable = intended_trainable(model)
    model.train()
    with after_first_classifier_update(model, images, labels):
        model.zero_grad(set_to_none=True)
        model.loss(model(images), labels, training=False).backward()
        problems, norms, frozen = _gradient_problems(model, trainable)
        model.zero_grad(set_to_none=True)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        return CheckResult("gradient flow", False, f"{len(problems)} problems: {shown}")
    summary = (
        f"{len(norms)} trainable tensors got finite non-zero gradients (norms {min(norms):.2e} "
        f"to {max(norms):.2e}); {frozen} frozen tensors got none"
    )
    return CheckResult("gradient flow", True, summary)


@contextmanager
def after_first_classifier_update(
    model: TransferClassifier, images: torch.Tensor, labels: torch.Tensor
) -> Iterator[None]:
    """The head's classifier moved as a first AdamW step moves it (FIRST_UPDATE_SIZE times the
    sign of its gradient on the batch) while the block runs; its weights are restored after."""
    classifier = model.head.classifier
    saved = {name: value.clone() for name, value in classifier.state_dict().items()}
    weights = list(classifier.parameters())
    gradients = torch.autograd.grad(model.loss(model(images), labels, training=False), weights)
    with torch.no_grad():
        for weight, gradient in zip(weights, gradients, strict=True):
            weight.sub_(FIRST_UPDATE_SIZE * gradient.sign())
    try:
        yield
    finally:
        classifier.load_state_dict(saved)


def _gradient_problems(
    model: TransferClassifier, trainable: set[str]
) -> tuple[list[str], list[float], int]:
    """Problems with the gradients now held, the trainable ones' norms, and the frozen count."""
    problems, norms = [], []
    frozen = 0
    for name, parameter in model.named_parameters():
        gradient = parameter.grad
        if name not in trainable:
            frozen += 1
            if gradient is not None and gradient.abs().sum().item() > 0:
                problems.append(f"{name}: frozen by the strategy but received a gradient")
        elif gradient is None:
            problems.append(f"{name}: trainable but received no gradient")
        elif not torch.isfinite(gradient).all():
            problems.append(f"{name}: non-finite gradient")
        elif gradient.abs().sum().item() == 0:
            problems.append(f"{name}: zero gradient")
        else:
            norms.append(gradient.norm().item())
    return problems, norms, frozen


# ---------------------------------------------------------------------------------------------
# All four on a config


def _device(accelerator: str) -> torch.device:
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def run_sanity_checks(
    config: FinetuneConfig,
    per_class: int = SAMPLES_PER_CLASS,
    overfit_steps: int = OVERFIT_STEPS,
    target: float = OVERFIT_TARGET,
    tolerance: float = INIT_LOSS_TOLERANCE,
) -> list[CheckResult]:
    """The four checks on the config's training data and model, returned (`report_lines` turns
    them into the printed report).

    The overfit check trains a second, fresh model with augmentation and regularisation off
    (dropout, weight decay, label smoothing and drop-path 0); nothing is written to disk.
    """
    if per_class < 1 or overfit_steps < 1:
        raise ConfigError(
            f"--per-class and --overfit-steps must be at least 1, got {per_class}, {overfit_steps}"
        )
    if config.strategy == "auto":
        # Nothing is measured here: check what auto may train, with its open choices at their
        # fixed values (finetune.provisional_strategy).
        config = dataclasses.replace(config, strategy=provisional_strategy(config))
    check_config(config)
    config = device_defaults(config)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    data = data_facts(config, datamodule)
    subset = balanced_subset(datamodule.train_set.samples, per_class, config.seed)
    classes = datamodule.classes
    logger.info(
        f"Sanity checks: {len(subset)} training images ({per_class} per class at most, "
        f"{len(classes)} classes) of {config.data_dir}; {config.backbone}, "
        f"strategy {config.strategy}"
    )
    device = _device(config.accelerator)
    model = build_model(config, data).to(device)
    loader = subset_loader(
        subset,
        datamodule.preprocessing,
        config.batch_size,
        True,
        config.seed,
        max_pixels=config.max_image_pixels,
        source=datamodule.train_set,
        collate=datamodule.collator(),
    )
    images, labels = next(iter(loader))

    results = [check_loss_at_init(model, loader, tolerance=tolerance)]
    unregularised = dataclasses.replace(
        config, dropout=0.0, weight_decay=0.0, label_smoothing=0.0, drop_path_rate=0.0
    )
    results.append(
        check_overfit(
            build_model(unregularised, data),
            subset,
            datamodule.preprocessing,
            config.batch_size,
            overfit_steps,
            target,
            config.accelerator,
            config.seed,
            datamodule.num_workers,
            config.max_image_pixels,
            datamodule.train_set,
            datamodule.collator(),
        )
    )
    results.append(check_activations(model, images))
    results.append(check_gradient_flow(model, images, labels))
    return results
