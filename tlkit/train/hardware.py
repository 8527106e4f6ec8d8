"""Devices, nodes, precision and distributed strategy: Lightning's engine, configured for timm.

Everything here is Lightning's own machinery (DDP, FSDP, torchrun and SLURM launchers, mixed
precision); tlkit only chooses its settings from the config (`trainer_options`) and builds the
one-device Trainer of evaluation, prediction and the sanity checks (`single_device_trainer`).
Two things are tlkit's:

- SyncBatchNorm goes through timm's `convert_sync_batchnorm`, because Lightning's default
  (`torch.nn.SyncBatchNorm.convert_sync_batchnorm`) turns timm's `BatchNormAct2d` into a plain
  SyncBatchNorm and silently drops the activation fused into it (EfficientNet's ReLU6/SiLU).
- Frozen parameters never reach DDP's reducer (`requires_grad=False`), so DDP runs without
  `find_unused_parameters`; FSDP gets `use_orig_params=True` so frozen and trainable
  parameters can share a wrapped module.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.layer_sync import LayerSync
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from timm.layers import convert_sync_batchnorm
from torch import nn

from tlkit.config import FinetuneConfig
from tlkit.errors import ConfigError


class TimmSyncBatchNorm(LayerSync):
    """Lightning layer-sync plugin that converts BatchNorm the timm way (activations kept)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        # timm has no inverse conversion; SyncBatchNorm in eval mode (evaluation, prediction,
        # export after training) computes exactly what BatchNorm does.
        return model


def parse_devices(value: str) -> int | str | list[int]:
    """'2' -> 2, '0,1' -> [0, 1], 'auto' -> 'auto' (Lightning's `devices`)."""
    if value == "auto":
        return value
    if "," in value:
        return [int(index) for index in value.split(",") if index.strip()]
    return int(value)


def trainer_options(config: FinetuneConfig) -> dict[str, Any]:
    """The Trainer arguments for the config's hardware, precision and distribution."""
    if config.sync_batchnorm and config.accelerator == "cpu":
        raise ConfigError("--sync-batchnorm needs GPUs (torch's SyncBatchNorm is CUDA-only)")
    strategy: Any = config.dist_strategy
    if strategy == "ddp":
        strategy = DDPStrategy(find_unused_parameters=False)
    elif strategy == "fsdp":
        strategy = FSDPStrategy(use_orig_params=True)
    return {
        "accelerator": config.accelerator,
        "devices": parse_devices(config.devices),
        "num_nodes": config.num_nodes,
        "strategy": strategy,
        "precision": config.precision or "32",
        "accumulate_grad_batches": config.accumulate_grad_batches,
        "plugins": [TimmSyncBatchNorm()] if config.sync_batchnorm else None,
    }


def effective_batch_size(trainer: pl.Trainer, config: FinetuneConfig) -> int:
    """Images per optimiser step over all processes: per-device batch x processes x accumulation."""
    return config.batch_size * trainer.world_size * config.accumulate_grad_batches


def training_device(config: FinetuneConfig) -> str:
    """The kind of device the run trains on, as Lightning's `accelerator="auto"` picks it: a
    CUDA GPU where the config allows one and one is present, else the CPU. Known before any
    Trainer exists (auto's probe and measurements run first)."""
    gpu = config.accelerator in ("auto", "gpu") and torch.cuda.is_available()
    return "cuda" if gpu else "cpu"


def half_precision() -> str:
    """The 16-bit mixed precision of this machine's CUDA device: bf16-mixed where it supports
    bfloat16, else 16-mixed."""
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def device_defaults(config: FinetuneConfig) -> FinetuneConfig:
    """The config with `precision` and `channels_last` set for its device where not given:
    32-bit and channels-last on a CPU (16 bits do not pay there; oneDNN's NHWC convolutions
    do: tf_efficientnet_lite0's training step took 1.4-1.5x less CPU time for partial (2
    stages) and full at 64 and 224 px, its forward pass 1.3-1.6x less,
    `benchmarks/channels_last.py`); the device's half precision and channels-last on CUDA
    (AutoGluon and timm's train.py train in 16 bits on GPUs). A one-process CUDA run given
    neither measures them instead (`tlkit.train.device_settings`)."""
    precision = config.precision
    if precision is None:
        precision = half_precision() if training_device(config) == "cuda" else "32"
    channels_last = True if config.channels_last is None else config.channels_last
    return replace(config, precision=precision, channels_last=channels_last)


def run_identity() -> str:
    """What every process of one run shares, and no other run: torchrun's run id, SLURM's job
    and step, or else an id this process makes and passes on to the processes Lightning's
    launcher starts from it (they inherit its environment)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '')}"
    return os.environ.setdefault("TLKIT_RUN_ID", uuid.uuid4().hex)
