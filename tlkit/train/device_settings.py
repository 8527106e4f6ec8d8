"""Precision and memory layout on a GPU, measured at the run's own size instead of assumed.

On an H200, tlkit's default backbone (EfficientNet-Lite0) trained at 64 px and batch 64 about
4x slower in bf16-mixed and channels-last than in 32-bit and the default layout (steps that
small are bound by kernel launches, and autocast adds casts), yet at 224 px full fine-tuning
ran 1.1-1.3x faster in bf16-mixed and channels-last (docs/benchmarks.md, "Precision and memory
layout on a GPU"). So where a one-process CUDA run is given neither `--precision` nor
`--channels-last`, `choose_device_settings` times a few training steps of the run's model at
its input size and batch in 32-bit (both layouts) and in half precision with channels-last, and
keeps the fastest. Half precision in the default layout is not timed: it was never the fastest
there (at 64 and 224 px, batch 64 and 256, partial and full), and every setting timed costs a
first step that builds its kernels (the four settings took 18.6 s at 64 px on the H200).
Elsewhere (a CPU, several processes, either setting given) it applies
`hardware.device_defaults`.

The timing loop is tlkit's own (timm's benchmark.py times models the same way, as a script, not
a library function): random images, since a step's time does not depend on the pixels, and a
model without pretrained weights, since it does not depend on them either.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from tlkit.config import FinetuneConfig
from tlkit.model.backbones import preprocessing
from tlkit.runfolder import DataFacts
from tlkit.train.build import build_model
from tlkit.train.hardware import device_defaults, half_precision, training_device

WARMUP_STEPS = 3  # untimed: cuDNN's algorithm choice, the allocator
MIN_TIMED_STEPS = 5
MIN_TIMED_S = 0.25
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}

logger = logging.getLogger(__name__)


def measures_device_settings(config: FinetuneConfig) -> bool:
    """Whether the run's precision and layout are measured: one process on a CUDA device,
    neither setting given. Several processes keep the defaults: each would measure its own
    device, and they must train alike."""
    devices = config.devices.strip()
    one_device = devices == "1" or (devices == "auto" and torch.cuda.device_count() == 1)
    one_process = one_device and config.num_nodes == 1 and os.environ.get("WORLD_SIZE", "1") == "1"
    return (
        training_device(config) == "cuda"
        and config.precision is None
        and config.channels_last is None
        and one_process
    )


def choose_device_settings(
    config: FinetuneConfig, data: DataFacts
) -> tuple[FinetuneConfig, dict[str, Any] | None]:
    """The config with `precision` and `channels_last` set: measured where
    `measures_device_settings` says so (the fastest of 32-bit in both layouts and the
    device's half precision in channels-last), else the device's defaults. Returns the
    record of the measurement (None where nothing was measured)."""
    if not measures_device_settings(config):
        return device_defaults(config), None
    started = time.perf_counter()
    candidates = [("32", False), ("32", True), (half_precision(), True)]
    rates = measure_step_rates(config, data, candidates)
    measured = {candidate: rate for candidate, rate in rates.items() if rate is not None}
    if not measured:  # every candidate ran out of memory: the run will say so itself
        return device_defaults(config), None
    precision, channels_last = max(measured, key=measured.__getitem__)
    record = {
        "device": torch.cuda.get_device_name(),
        "input_size": preprocessing(config.backbone, config.img_size).input_size,
        "batch_size": config.batch_size,
        "candidates": [
            {"precision": p, "channels_last": layout, "images_per_s": rate}
            for (p, layout), rate in rates.items()
        ],
        "precision": precision,
        "channels_last": channels_last,
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info(describe(record))
    return replace(config, precision=precision, channels_last=channels_last), record


def describe(record: dict[str, Any]) -> str:
    """One line: the settings chosen and what each candidate measured."""

    def name(precision: str, channels_last: bool) -> str:
        return f"{precision}, {'channels-last' if channels_last else 'default layout'}"

    rates = ", ".join(
        f"{name(c['precision'], c['channels_last'])} "
        + ("out of memory" if c["images_per_s"] is None else f"{c['images_per_s']:.0f}")
        for c in record["candidates"]
    )
    return (
        f"Device settings: {name(record['precision'], record['channels_last'])}, the fastest "
        f"training step on {record['device']} at {record['input_size']} px, batch "
        f"{record['batch_size']} (images/s: {rates})"
    )


def measure_step_rates(
    config: FinetuneConfig, data: DataFacts, candidates: list[tuple[str, bool]]
) -> dict[tuple[str, bool], float | None]:
    """Images/s of the run's training step (its backbone's forward pass where the run trains on
    cached features) in each (precision, channels-last) candidate, on the run's device; None
    for a candidate that runs out of memory."""
    device = training_device(config)
    model = build_model(replace(config, pretrained="none", channels_last=False), data).to(device)
    model.train()  # frozen backbone modules stay in eval mode (TransferClassifier.train)
    optimizer, _ = model.optimizer_and_schedule(total_steps=1000, steps_per_epoch=100)
    size = preprocessing(config.backbone, config.img_size).input_size
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    extraction_only = config.strategy == "features" and config.cache
    rates: dict[tuple[str, bool], float | None] = {}
    for precision, channels_last in candidates:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        batch = images.contiguous(memory_format=layout)
        step = _step(model, optimizer, batch, precision, extraction_only, device)
        try:
            seconds = _seconds_per_step(step, device)
            rates[(precision, channels_last)] = round(config.batch_size / seconds, 1)
        except torch.OutOfMemoryError:
            rates[(precision, channels_last)] = None
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return rates


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    precision: str,
    extraction_only: bool,
    device: str,
) -> Callable[[], None]:
    """One training step of `model` on `batch` at `precision`, as Lightning's precision plugin
    runs it (autocast; a gradient scaler for 16-mixed), or its backbone's forward pass."""
    dtype = AUTOCAST_DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device, enabled=precision == "16-mixed")

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            if extraction_only:
                with torch.no_grad():
                    model.backbone(batch)
                return
            loss = model(batch).float().logsumexp(dim=1).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _seconds_per_step(step: Callable[[], None], device: str) -> float:
    """The mean time of `step` after `WARMUP_STEPS`, over at least `MIN_TIMED_STEPS` steps and
    `MIN_TIMED_S` seconds; each step waits for the device, as a run's logged loss makes it."""

    def synchronised() -> None:
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(WARMUP_STEPS):
        synchronised()
    started, steps = time.perf_counter(), 0
    while steps < MIN_TIMED_STEPS or time.perf_counter() - started < MIN_TIMED_S:
        synchronised()
        steps += 1
    return (time.perf_counter() - started) / steps
