"""Messy folders, killed runs, untrusted files, diverging training."""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY_CONFIG,
    TINY_RUN_FLAGS,
    finetune_killed_after_first_checkpoint,
    write_colour_images,
)
from PIL import Image

from tlkit.cli import main
from tlkit.config import FinetuneConfig
from tlkit.data.sources import read_csv
from tlkit.errors import TrainingDivergedError
from tlkit.model.backbones import create_backbone
from tlkit.model.classifier import TransferClassifier
from tlkit.runfolder import read_metrics, read_summary
from tlkit.train.finetune import finetune


def jpeg_bytes(size=(48, 48), colour=(200, 40, 40), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def make_messy_folder(root: Path) -> dict[str, str]:
    """A dataset with every kind of awkward file; returns {file name: expected outcome}."""
    write_colour_images(root, per_class=6, seed=0)
    (root / "red").rename(root / "rouge foncé")  # unicode and a space in a class name
    (root / "green").rename(root / "緑")
    red, green, blue = root / "rouge foncé", root / "緑", root / "blue"
    (red / "truncated.jpg").write_bytes(jpeg_bytes()[:400])
    (red / "empty.jpg").write_bytes(b"")
    (red / "text.jpg").write_text("this is not an image")
    Image.new("RGB", (40, 40), (200, 40, 40)).save(red / "png_named.jpg", format="PNG")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(red / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(green / "sixteen_bit.png")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 40, 200, 40] + [0] * 762)
    palette.save(green / "palette_transparent.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    (green / "rotated.jpg").write_bytes(jpeg_bytes((40, 20), (40, 200, 40), exif=exif.tobytes()))
    Image.new("RGB", (120, 120), (40, 40, 200)).save(blue / "huge.png")  # above the test limit
    Image.new("RGB", (1, 1), (40, 40, 200)).save(blue / "one_pixel.png")
    (blue / "notes.txt").write_text("not an image")
    os.symlink(blue, blue / "loop")
    os.symlink(root / "missing.png", blue / "dangling.png")
    os.mkfifo(blue / "pipe.jpg")  # opening it for reading would block forever
    return {
        "truncated.jpg": "skipped",
        "empty.jpg": "skipped",
        "text.jpg": "skipped",
        "png_named.jpg": "used",
        "cmyk.jpg": "used",
        "sixteen_bit.png": "used",
        "palette_transparent.png": "used",
        "rotated.jpg": "used",
        "huge.png": "skipped",
        "one_pixel.png": "used",
        "notes.txt": "ignored",  # not an image: counted by extension, not listed
        "dangling.png": "skipped",
        "pipe.jpg": "skipped",
    }


def test_messy_folder_trains_with_every_bad_file_skipped_and_listed(tmp_path: Path):
    expected = make_messy_folder(tmp_path / "data")
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            str(tmp_path / "data"),
            "--out",
            str(out),
            *TINY_RUN_FLAGS,
            "--epochs",
            "1",
            "--max-image-pixels",
            "10000",
        ]
    )
    assert code == 0
    with open(out / "skipped.csv", newline="") as handle:
        skipped = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(handle)}
    assert set(skipped) == {name for name, outcome in expected.items() if outcome == "skipped"}
    assert "above the limit of 10,000" in skipped["huge.png"]
    summary = read_summary(out)
    assert summary.skipped_files == len(skipped)
    assert summary.ignored_files == {".txt": 1} and summary.unread_images == {}
    assert summary.classes == ["blue", "rouge foncé", "緑"]
    used = 3 * 6 + sum(outcome == "used" for outcome in expected.values())
    assert summary.train_images + summary.val_images + summary.test_images == used


def test_permission_denied_file_is_skipped(tmp_path: Path):
    write_colour_images(tmp_path, per_class=2, seed=0)
    secret = tmp_path / "red" / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    secret.chmod(0)
    command = [
        sys.executable,
        "-c",
        "from tlkit.data.sources import scan_folder; "
        f"print(scan_folder({str(tmp_path)!r}).skipped)",
    ]
    if os.geteuid() == 0:  # root reads any file: drop the capabilities that let it
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "secret.png" in result.stdout and "Permission denied" in result.stdout


def test_csv_paths_outside_the_root_only_when_allowed(tmp_path: Path):
    write_colour_images(tmp_path / "images", per_class=2, seed=0)
    (tmp_path / "lists").mkdir()
    csv_file = tmp_path / "lists" / "labels.csv"
    csv_file.write_text("path,label\n../images/red/000.jpg,red\n../images/blue/000.jpg,blue\n")
    with pytest.raises(ValueError, match="csv-paths-outside-root"):
        read_csv(csv_file)
    assert len(read_csv(csv_file, allow_outside_root=True).samples) == 2


class _RunsCodeOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_is_refused_and_never_runs(tiny_run: Path, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "summary.json"):
        (run / name).write_bytes((tiny_run / name).read_bytes())
    malicious = {"state_dict": {}, "payload": _RunsCodeOnLoad(marker)}
    torch.save(malicious, run / "best.ckpt")
    torch.save(malicious, run / "last.ckpt")
    assert main(["evaluate", str(run), str(tiny_run)]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert main(["finetune", "--resume", "--out", str(run)]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert not marker.exists()


def test_diverging_training_stops_with_a_clear_message(colour_folder, tmp_path, monkeypatch):
    original = TransferClassifier.training_step

    def breaks_in_the_second_epoch(self, batch, batch_index):
        loss = original(self, batch, batch_index)
        return loss * float("nan") if self.current_epoch == 1 else loss

    monkeypatch.setattr(TransferClassifier, "training_step", breaks_in_the_second_epoch)
    out = tmp_path / "run"
    config = FinetuneConfig(
        data_dir=str(colour_folder), out=str(out), **{**TINY_CONFIG, "val_fraction": 0.1}, epochs=3
    )
    with pytest.raises(
        TrainingDivergedError, match=r"epoch 2, step 4 \(batch 1 of the epoch\), learning rate"
    ) as error:
        finetune(config, enable_progress_bar=False)
    assert "tlkit sanity" in str(error.value)
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(tensor).all() for tensor in last["state_dict"].values())


def _epoch(row: dict[str, str]) -> int:
    return int(float(row["epoch"]))


def frozen_batchnorm_means(state_dict: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        key[len(prefix) :]: value
        for key, value in state_dict.items()
        if key.startswith(prefix) and key.endswith("running_mean")
    }


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(colour_folder: Path, tmp_path: Path):
    flags = [*TINY_RUN_FLAGS, "--epochs", "6", "--patience", "10"]
    killed = tmp_path / "killed"
    completed_before = finetune_killed_after_first_checkpoint(colour_folder, killed, flags)
    assert completed_before < 6
    metrics_before = read_metrics(killed)

    assert main(["finetune", "--resume", "--out", str(killed)]) == 0
    straight = tmp_path / "straight"
    assert main(["finetune", str(colour_folder), "--out", str(straight), *flags]) == 0

    resumed, reference = read_summary(killed), read_summary(straight)
    assert resumed.resumed is True
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.epochs_run == reference.epochs_run == 6
    # The learning-rate schedule continued from its position, not from the start.
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in reference.history])
    # metrics.csv kept what the killed process had flushed of the completed epochs, and has
    # every epoch trained after the resume.
    metrics_after = {
        (row["epoch"], row["step"], row.get("val_acc")) for row in read_metrics(killed)
    }
    kept = [row for row in metrics_before if row["epoch"] and _epoch(row) < completed_before]
    assert all((r["epoch"], r["step"], r.get("val_acc")) in metrics_after for r in kept)
    validated = {_epoch(row) for row in read_metrics(killed) if row["val_acc"]}
    assert set(range(completed_before, 6)) <= validated
    # Frozen stages stayed frozen, BatchNorm statistics included, across the resume.
    final = torch.load(killed / "last.ckpt", weights_only=True)["state_dict"]
    model = TransferClassifier.load_checkpoint(killed / "last.ckpt")
    frozen = {name for name, p in model.backbone.named_parameters()}
    assert frozen  # sanity: the backbone has parameters
    pretrained = frozen_batchnorm_means(
        create_backbone("tf_efficientnet_lite0", "bundled").state_dict()
    )
    trained = frozen_batchnorm_means(final, "backbone.")
    unchanged = [name for name in pretrained if torch.equal(pretrained[name], trained[name])]
    changed = [name for name in pretrained if name not in unchanged]
    assert unchanged and changed  # frozen stages kept theirs; the trained last stage adapted
    assert all(name.startswith(("blocks.6", "conv_head", "bn2")) for name in changed)
