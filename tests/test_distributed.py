"""Distributed training through Lightning: two real processes on the CPU (gloo)."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import finetune_killed_after_first_checkpoint, write_identical_images
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from timm.layers import BatchNormAct2d

from tlkit.cli import main
from tlkit.config import FinetuneConfig
from tlkit.data.datamodule import ImageDataModule
from tlkit.infer.predict import evaluate, load_model, predict_probabilities
from tlkit.model.backbones import create_backbone
from tlkit.runfolder import Preprocessing, read_summary
from tlkit.train.hardware import TimmSyncBatchNorm, trainer_options

PREPROCESSING = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


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


def test_loader_workers_of_a_distributed_process_start_from_a_fork_server(
    colour_folder: Path, tmp_path: Path
):
    """Inside a process group, forking a worker can deadlock it (CPython gh-112275): workers
    start from a fork server there, and load the same batches; elsewhere they are forked."""
    data = ImageDataModule(colour_folder, PREPROCESSING, num_workers=1, val_fraction=0.4)
    data.setup()
    assert data.val_dataloader().multiprocessing_context is None
    expected = [batch[0] for batch in data.val_dataloader()]
    store = f"file://{tmp_path / 'store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        loader = data.val_dataloader()
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        loaded = [batch[0] for batch in loader]
    finally:
        torch.distributed.destroy_process_group()
    assert len(loaded) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(loaded, expected, strict=True))


def test_ddp_spawn_is_not_offered(capsys):
    """Lightning's spawn launcher returns none of the spawned processes' state (epoch history,
    feature-cache report), so its run folders would be incomplete; `ddp` does the same work."""
    with pytest.raises(ValueError, match="dist_strategy must be one of auto, ddp, fsdp$"):
        FinetuneConfig(dist_strategy="ddp_spawn")
    with pytest.raises(SystemExit):
        main(["finetune", "DATA", "--dist-strategy", "ddp_spawn"])
    assert "invalid choice: 'ddp_spawn'" in capsys.readouterr().err


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


def run_cli(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tlkit ...` in a fresh process: Lightning's DDP launcher starts the second one."""
    return subprocess.run(
        [sys.executable, "-m", "tlkit.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.mark.slow
# partial: frozen parameters, which never reach DDP's reducer; features: the cached path.
# (full trains every parameter, DDP's plainest case, and kept the suite past 15 minutes.)
@pytest.mark.parametrize("strategy", ["features", "partial"])
def test_two_process_ddp_run_through_the_cli(strategy, colour_folder: Path, tmp_path: Path):
    out = tmp_path / strategy
    flags = [*DDP_FLAGS, "--strategy", strategy, "--unfreeze-stages", "1"]
    cache = {"TLKIT_CACHE": str(tmp_path / "cache")}  # a new scan index: a cold scan
    arguments = ["-v", "finetune", str(colour_folder), "--out", str(out), "--epochs", "1"]
    result = run_cli(*arguments, *flags, env=cache)  # -v: the scan's lines (DEBUG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Effective batch size 16 (8 per device x 2 processes" in result.stdout
    # channels-last before DDP wraps the model: its gradient buckets match the parameters
    assert "Grad strides do not match bucket view strides" not in result.stderr
    # Each rank scans train/ and test/; the 42 images are decoded once in all (scan index).
    decoded = re.findall(r"Scanned .*: \d+ images, (\d+) decoded now", result.stdout)
    assert len(decoded) == 4 and sum(map(int, decoded)) == 42
    summary = read_summary(out)
    assert summary.epochs_run == 1 and summary.test_images == 12
    # --tta auto's choice: made by the first process alone, on one device, after DDP training
    assert summary.tta_choice["images"] == summary.val_images
    assert {p.name for p in out.iterdir()} >= {
        "best.ckpt",
        "last.ckpt",
        "summary.json",
        "metrics.csv",
        "config.yaml",
        "skipped.csv",
    }
    # Validation accuracy was synced across both processes: it equals a single-process
    # evaluation of the same checkpoint on the same validation images (no sampler padding).
    model = load_model(out)
    data = ImageDataModule(colour_folder, model.preprocessing, num_workers=0, val_fraction=0.4)
    data.setup()
    assert len(data.val_set) == summary.val_images and summary.val_images % 2 == 1
    probabilities = predict_probabilities(model, data.val_set.samples, accelerator="cpu").values
    labels = torch.tensor([label for _, label in data.val_set.samples])
    single = (probabilities.argmax(1) == labels).float().mean().item()
    # Counted over exactly the split's images (padding would count k of n + 1: not a multiple
    # of 1/n), and equal to the single-process evaluation up to one image: a barely trained
    # model's near-tied logits can flip between 2 single-thread processes and 1 two-thread one.
    count = summary.best_val_acc * summary.val_images
    assert count == pytest.approx(round(count), abs=1e-4)
    assert abs(summary.best_val_acc - single) <= 1 / summary.val_images + 1e-6


@pytest.mark.slow
def test_killed_ddp_run_resumes_from_last_checkpoint(colour_folder: Path, tmp_path: Path):
    out = tmp_path / "killed"
    flags = [*DDP_FLAGS, "--strategy", "partial", "--epochs", "4", "--patience", "9", "--ema"]
    assert finetune_killed_after_first_checkpoint(colour_folder, out, flags) < 4

    resumed = run_cli("finetune", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = read_summary(out)
    assert summary.resumed and [h["epoch"] for h in summary.history] == [1, 2, 3, 4]
    # The weight average (--ema) went on from the checkpoint: one update per optimiser step of
    # the whole run, none lost or repeated by the kill and the resume.
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["averaging_state"]["n_averaged"] == last["global_step"] > 0


PROBE = Path(__file__).with_name("ddp_probe.py")


@pytest.fixture(scope="module")
def identical_images(tmp_path_factory) -> Path:
    """train/ (10 + 10), val/ (3 + 2) and test/ (2 + 1) copies of one image: the model's
    constant prediction makes any image counted twice show in the accuracy."""
    root = tmp_path_factory.mktemp("identical")
    for split, (a, b) in {"train": (10, 10), "val": (3, 2), "test": (2, 1)}.items():
        write_identical_images(root / split, {"a": a, "b": b})
    return root


def run_probe(config: FinetuneConfig, probe: Path, launcher: list[str]) -> dict[int, dict]:
    """`tests/ddp_probe.py` with two CPU processes; returns what each rank recorded."""
    values = json.dumps(dataclasses.asdict(config))
    result = subprocess.run(
        [*launcher, str(PROBE), values, str(probe)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {rank: json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)}


DDP_CONFIG = dict(
    pretrained="bundled",
    img_size=32,
    seed=0,
    lr=3e-3,
    accelerator="cpu",
    devices="2",
    dist_strategy="ddp",
)


@pytest.mark.slow
def test_ddp_batches_augmentation_and_metrics_per_rank(identical_images: Path, tmp_path: Path):
    """20 training images, batch 16, 2 processes: 10 per rank, so no rank may drop its only
    (incomplete) batch; each rank augments its own images; validation (5 images) and test (3)
    count every image once."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    config = FinetuneConfig(
        data_dir=str(identical_images),
        out=str(out),
        **DDP_CONFIG,
        batch_size=16,
        num_workers=1,
        epochs=2,
        patience=9,
        strategy="partial",
        unfreeze_stages=1,
    )
    ranks = run_probe(config, probe, [sys.executable])
    assert ranks[0]["batches_per_epoch"] == ranks[1]["batches_per_epoch"] == [1, 1]
    first = {rank: torch.load(probe / f"rank{rank}-epoch0.pt") for rank in (0, 1)}
    assert first[0].shape == first[1].shape == (10, 3, 32, 32)
    assert not torch.equal(first[0], first[1])

    summary = read_summary(out)
    assert summary.epochs_run == 2 and (summary.val_images, summary.test_images) == (5, 3)
    assert summary.best_val_acc == pytest.approx(evaluate(out, identical_images / "val")["top1"])
    assert summary.test_acc == pytest.approx(evaluate(out, identical_images / "test")["top1"])
    model = load_model(out)
    data = ImageDataModule(identical_images, model.preprocessing, num_workers=0)
    data.setup()
    probabilities = predict_probabilities(model, data.val_set.samples, accelerator="cpu").values
    labels = torch.tensor([label for _, label in data.val_set.samples])
    single_loss = torch.nn.functional.nll_loss(probabilities.log(), labels).item()
    best = summary.history[summary.best_epoch - 1]
    assert best["val_loss"] == pytest.approx(single_loss, rel=1e-4)


@pytest.mark.slow
def test_ddp_feature_cache_is_extracted_once(colour_folder: Path, tmp_path: Path):
    """Under torchrun every process runs the whole script; the features are still extracted
    once in total, and the run completes."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(out),
        **DDP_CONFIG,
        batch_size=8,
        num_workers=0,
        val_fraction=0.4,
        epochs=1,
        strategy="features",
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    ranks = run_probe(config, probe, [*torchrun, "--nproc-per-node", "2"])
    extracted = ranks[0]["extracted_rows"] + ranks[1]["extracted_rows"]
    summary = read_summary(out)
    # validation, test, train: once each
    assert sorted(extracted) == sorted([summary.val_images, 12, summary.train_images])
    assert summary.epochs_run == 1 and summary.test_acc is not None
    assert {summary.feature_cache[split]["reused"] for split in ("train", "val", "test")} == {False}
    assert (out / "best.ckpt").is_file()
