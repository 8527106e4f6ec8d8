"""Distributed training through Lightning: two real processes on the CPU (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import finetune_killed_after_first_checkpoint
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from timm.layers import BatchNormAct2d

from tlkit.backbones import create_backbone
from tlkit.config import FinetuneConfig
from tlkit.data import ImageDataModule
from tlkit.distributed import TimmSyncBatchNorm, trainer_options
from tlkit.inference import load_model, predict_probabilities
from tlkit.runfolder import read_summary


def test_sync_batchnorm_keeps_timms_fused_activations():
    backbone = create_backbone("tf_efficientnet_lite0", "bundled").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone(images)
    assert any(isinstance(m, BatchNormAct2d) for m in backbone.modules())
    converted = TimmSyncBatchNorm().apply(backbone).eval()
    assert not any(type(m) is BatchNormAct2d for m in converted.modules())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    with torch.no_grad():
        assert torch.allclose(converted(images), expected, atol=1e-6)
    # torch's own conversion (Lightning's default) drops the activation fused into the norm:
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        create_backbone("tf_efficientnet_lite0", "bundled")
    ).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(images), expected, atol=1e-3)


def test_trainer_options_follow_the_config():
    options = trainer_options(
        FinetuneConfig(
            dist_strategy="ddp",
            devices="0,1",
            num_nodes=2,
            precision="bf16-mixed",
            sync_batchnorm=True,
        )
    )
    assert isinstance(options["strategy"], DDPStrategy)
    assert options["strategy"]._ddp_kwargs.get("find_unused_parameters") is False
    assert options["devices"] == [0, 1] and options["num_nodes"] == 2
    assert options["precision"] == "bf16-mixed"
    assert isinstance(options["plugins"][0], TimmSyncBatchNorm)
    fsdp = trainer_options(FinetuneConfig(dist_strategy="fsdp"))["strategy"]
    assert isinstance(fsdp, FSDPStrategy) and fsdp.kwargs["use_orig_params"] is True
    with pytest.raises(ValueError, match="dist_strategy must be one of"):
        FinetuneConfig(dist_strategy="horovod")
    with pytest.raises(ValueError, match="needs GPUs"):
        trainer_options(FinetuneConfig(accelerator="cpu", sync_batchnorm=True))


DDP_FLAGS = [
    "--pretrained",
    "bundled",
    "--img-size",
    "32",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--val-fraction",
    "0.4",
    "--seed",
    "0",
    "--lr",
    "3e-3",
    "--accelerator",
    "cpu",
    "--devices",
    "2",
    "--dist-strategy",
    "ddp",
]


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """`tlkit ...` in a fresh process: Lightning's DDP launcher starts the second one."""
    return subprocess.run(
        [sys.executable, "-m", "tlkit.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["features", "partial", "full"])
def test_two_process_ddp_run_through_the_cli(strategy, colour_folder: Path, tmp_path: Path):
    out = tmp_path / strategy
    flags = [*DDP_FLAGS, "--strategy", strategy, "--unfreeze-stages", "1"]
    result = run_cli("finetune", str(colour_folder), "--out", str(out), "--epochs", "1", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Effective batch size 16 (8 per device x 2 processes" in result.stdout
    summary = read_summary(out)
    assert summary["epochs_run"] == 1 and summary["test_images"] == 12
    assert {p.name for p in out.iterdir()} >= {
        "best.ckpt",
        "last.ckpt",
        "summary.json",
        "metrics.csv",
        "config.yaml",
        "skipped.csv",
    }
    # Validation accuracy was synced across both processes: it equals a single-process
    # evaluation of the same checkpoint on the same 12 validation images (no sampler padding).
    model = load_model(out)
    data = ImageDataModule(colour_folder, model.preprocessing, num_workers=0, val_fraction=0.4)
    data.setup()
    assert len(data.val_set) == 12
    probabilities, _ = predict_probabilities(model, data.val_set.samples, accelerator="cpu")
    labels = torch.tensor([label for _, label in data.val_set.samples])
    single = (probabilities.argmax(1) == labels).float().mean().item()
    assert summary["best_val_acc"] == pytest.approx(single)


@pytest.mark.slow
def test_killed_ddp_run_resumes_from_last_checkpoint(colour_folder: Path, tmp_path: Path):
    out = tmp_path / "killed"
    flags = [*DDP_FLAGS, "--strategy", "partial", "--epochs", "4", "--patience", "9"]
    assert finetune_killed_after_first_checkpoint(colour_folder, out, flags) < 4

    resumed = run_cli("finetune", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = read_summary(out)
    assert summary["resumed"] and [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
