"""--budget and the device: durations, device defaults, the schedule that fits a budget (pure,
on measured-like numbers), and one tiny run that measures, plans and records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

from tlkit.config import FIXED_CHOICES, FinetuneConfig, parse_duration
from tlkit.errors import ConfigError
from tlkit.train import auto, budget, hardware
from tlkit.train.finetune import finetune

# Lite0 at 64 px on a 2-core CPU, roughly: 100 training and 300 evaluation images/s
CPU_LIKE = budget.Throughput("cpu", 100.0, 300.0, checkpoint_s=0.2, measured_s=5.0)


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("45", 45)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10x", "0m"])
def test_a_budget_that_is_no_duration_is_refused_by_the_config(text):
    with pytest.raises(ConfigError, match="budget"):
        FinetuneConfig(data_dir="x", budget=text)


def test_device_defaults_follow_the_device_and_keep_what_is_given(monkeypatch):
    cpu = hardware.device_defaults(FinetuneConfig(data_dir="x", accelerator="cpu"))
    assert (cpu.precision, cpu.channels_last) == ("32", True)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda: True)
    gpu = hardware.device_defaults(FinetuneConfig(data_dir="x"))
    assert (gpu.precision, gpu.channels_last) == ("bf16-mixed", True)
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda: False)
    assert hardware.device_defaults(FinetuneConfig(data_dir="x")).precision == "16-mixed"
    given = FinetuneConfig(data_dir="x", precision="32", channels_last=False)
    assert hardware.device_defaults(given) == given


def test_the_schedule_fills_the_budget_up_to_the_wanted_images():
    splits = budget.Splits(train=5000, val=1000, test=2000)
    # test 2000 / 300 = 6.7 s; an epoch's validation and checkpoints 3.7 s; 100 images/s
    roomy = budget.fit_schedule(20_000, splits, 64, CPU_LIKE, seconds_left=10_000)
    assert roomy.images == pytest.approx(20_000, rel=0.02)  # all that is wanted
    tight = budget.fit_schedule(256_000, splits, 64, CPU_LIKE, seconds_left=600)
    assert tight.predicted_s <= 600
    assert tight.images > 500 * 100 * 0.9  # nearly all of the time trains
    assert budget.fit_schedule(256_000, splits, 64, CPU_LIKE, seconds_left=40) is None
    cached = budget.fit_schedule(50_000, splits, 64, CPU_LIKE, seconds_left=40, cached=True)
    assert cached is not None and cached.epochs == 10  # extraction of 8,000 images: 27 s


def test_the_tta_choice_after_training_is_planned_into_the_budget():
    """Every candidate preset's views of at most 1,000 validation images at the evaluation
    rate: 1 + 2 + 10 + 30 views with flips and scale augmentation; none without the choice."""
    config = FinetuneConfig(data_dir="x", strategy="partial", img_size=64)
    rate = CPU_LIKE.eval_images_per_s
    small = budget.Splits(train=500, val=50, test=100)
    assert budget.tta_choice_s(config, small, CPU_LIKE) == pytest.approx(50 * 43 / rate)
    large = budget.Splits(train=50_000, val=5_000, test=100)
    assert budget.tta_choice_s(config, large, CPU_LIKE) == pytest.approx(1000 * 43 / rate)
    plain = FinetuneConfig(data_dir="x", strategy="partial", img_size=64, augment=False)
    assert budget.tta_choice_s(plain, small, CPU_LIKE) == pytest.approx(50 * (1 + 5) / rate)
    off = FinetuneConfig(data_dir="x", strategy="partial", img_size=64, choose_tta=False)
    assert budget.tta_choice_s(off, small, CPU_LIKE) == 0


def test_a_budgeted_run_measures_plans_and_records(colour_folder: Path, tmp_path: Path):
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        budget="1m",
        accelerator="cpu",
        **{**TINY_CONFIG, "strategy": "auto", "img_size": 32},
    )
    summary = finetune(config, enable_progress_bar=False)
    planned = json.loads((tmp_path / "run" / "auto.json").read_text())["budget"]
    assert planned["seconds"] == 60 and planned["fits"] and not planned["stepped_down"]
    assert planned["tta_choice_s"] > 0  # the choice after training is planned in
    throughput = planned["throughput"]
    assert throughput["device"] == "cpu" and throughput["train_images_per_s"] > 0
    assert 0 < planned["predicted_s"] <= 60 * budget.BUDGET_SHARE
    assert summary.wall_time_s < 60
    assert summary.auto_decision["budget"] == planned
    # the schedule the budget sized runs to its end: patience covers it, and every epoch ran
    epochs = planned["schedule"]["epochs"]
    assert summary.auto_decision["choices"]["patience"]["value"] == epochs
    assert summary.epochs_run == epochs


def test_only_a_budget_lets_the_planned_schedule_run_past_the_default_patience():
    assert auto.choose_patience().value == FIXED_CHOICES["patience"] == 5
    assert auto.choose_patience(120).value == 120


def test_a_negative_patience_is_refused_by_name():
    with pytest.raises(ConfigError, match="patience=-1"):
        FinetuneConfig(data_dir="data", patience=-1)
