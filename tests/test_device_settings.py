"""Precision and memory layout on a GPU are measured at the run's size (tlkit/train/
device_settings.py): the fastest candidate is kept and recorded, a setting given or several
processes keep the defaults, and the timing loop runs (here on the CPU, in bf16 autocast too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from conftest import TINY_CONFIG

from tlkit import FinetuneConfig, finetune
from tlkit.train import build as build_module
from tlkit.train import device_settings
from tlkit.train import finetune as finetune_module
from tlkit.train.callbacks import EpochProgressBar, StopOnNonFiniteLoss

# measured-like rates: on an H200, Lite0 at 64 px and batch 64 (docs/benchmarks.md)
RATES = {
    ("32", False): 8025.0,
    ("32", True): 6185.0,
    ("bf16-mixed", True): 2028.0,
}


@pytest.fixture
def one_cuda_device(monkeypatch):
    """A machine with one CUDA device (bfloat16 supported), as the measurement sees it."""
    monkeypatch.setattr(device_settings, "training_device", lambda config: "cuda")
    monkeypatch.setattr(device_settings.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(device_settings.torch.cuda, "get_device_name", lambda: "Test GPU")
    monkeypatch.setattr(device_settings, "half_precision", lambda: "bf16-mixed")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_one_cuda_device_with_nothing_given_measures(one_cuda_device):
    assert device_settings.measures_device_settings(FinetuneConfig(data_dir="x"))
    assert device_settings.measures_device_settings(FinetuneConfig(data_dir="x", devices="auto"))


@pytest.mark.parametrize(
    "given",
    [
        {"precision": "32"},
        {"channels_last": True},
        {"devices": "2"},
        {"devices": "0,1"},
        {"num_nodes": 2},
    ],
)
def test_a_setting_given_or_several_processes_keep_the_defaults(one_cuda_device, given):
    assert not device_settings.measures_device_settings(FinetuneConfig(data_dir="x", **given))


def test_a_process_of_torchrun_keeps_the_defaults(one_cuda_device, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not device_settings.measures_device_settings(FinetuneConfig(data_dir="x"))


def test_the_cpu_keeps_its_measured_defaults_without_timing(monkeypatch):
    monkeypatch.setattr(device_settings, "measure_step_rates", pytest.fail)
    config = FinetuneConfig(data_dir="x", accelerator="cpu")
    chosen, record = device_settings.choose_device_settings(config, data=None)
    assert (chosen.precision, chosen.channels_last, record) == ("32", True, None)


def test_the_fastest_candidate_is_kept_and_recorded(one_cuda_device, monkeypatch):
    monkeypatch.setattr(device_settings, "measure_step_rates", lambda c, d, candidates: RATES)
    config = FinetuneConfig(data_dir="x", img_size=64)
    chosen, record = device_settings.choose_device_settings(config, data=None)
    assert (chosen.precision, chosen.channels_last) == ("32", False)
    assert (record["precision"], record["channels_last"]) == ("32", False)
    assert (record["device"], record["input_size"], record["batch_size"]) == ("Test GPU", 64, 64)
    assert len(record["candidates"]) == 3
    line = device_settings.describe(record)
    assert "32, default layout, the fastest" in line and "bf16-mixed, channels-last 2028" in line


def test_a_candidate_out_of_memory_is_passed_over(one_cuda_device, monkeypatch):
    rates = {**RATES, ("32", False): None, ("32", True): None}
    monkeypatch.setattr(device_settings, "measure_step_rates", lambda c, d, candidates: rates)
    chosen, record = device_settings.choose_device_settings(FinetuneConfig(data_dir="x"), None)
    assert (chosen.precision, chosen.channels_last) == ("bf16-mixed", True)
    assert "32, default layout out of memory" in device_settings.describe(record)


def test_the_timing_loop_times_every_candidate(colour_folder: Path, monkeypatch):
    monkeypatch.setattr(device_settings, "WARMUP_STEPS", 1)  # a few steps are enough here
    monkeypatch.setattr(device_settings, "MIN_TIMED_S", 0.0)
    monkeypatch.setattr(device_settings, "MIN_TIMED_STEPS", 1)
    config = FinetuneConfig(data_dir=str(colour_folder), accelerator="cpu", **TINY_CONFIG)
    images = build_module.build_datamodule(config)
    images.setup("fit")
    data = build_module.data_facts(config, images)
    candidates = [("32", False), ("32", True), ("bf16-mixed", True)]
    rates = device_settings.measure_step_rates(config, data, candidates)
    assert list(rates) == candidates and all(rate > 0 for rate in rates.values())
    features = FinetuneConfig(**{**vars(config), "strategy": "features"})
    assert device_settings.measure_step_rates(features, data, [("32", True)])[("32", True)] > 0


class Callbacks(pl.Callback):
    def on_fit_start(self, trainer, module) -> None:
        self.found = {type(callback): callback for callback in trainer.callbacks}


def test_a_run_trains_in_the_measured_settings(monkeypatch, colour_folder, tmp_path):
    """The run's config.yaml records the measured choice, and the progress bar and the
    divergence check read the loss at the device's rate (the Trainer stays on the CPU)."""

    def unset(config: FinetuneConfig) -> bool:
        return config.precision is None and config.channels_last is None

    monkeypatch.setattr(device_settings, "measures_device_settings", unset)
    monkeypatch.setattr(device_settings, "measure_step_rates", lambda c, d, candidates: RATES)
    monkeypatch.setattr(device_settings.torch.cuda, "get_device_name", lambda: "Test GPU")
    monkeypatch.setattr(device_settings, "half_precision", lambda: "bf16-mixed")
    config = FinetuneConfig(
        data_dir=str(colour_folder), out=str(tmp_path / "run"), **{**TINY_CONFIG, "epochs": 1}
    )
    monkeypatch.setitem(finetune_module.DEVICE_READ_EVERY, "cpu", 7)
    seen = Callbacks()
    finetune(config, callbacks=[seen], limit_test_batches=0)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (recorded["precision"], recorded["channels_last"]) == ("32", False)
    assert seen.found[EpochProgressBar].refresh_rate == 7
    assert seen.found[StopOnNonFiniteLoss].check_every == 7


def test_auto_measures_them_before_its_budget_and_records_them(monkeypatch, colour_folder):
    """Auto chooses the settings before it times the candidate configuration for --budget, so
    that the schedule is planned at the speed the run will train at."""
    from tlkit.train import auto, budget

    monkeypatch.setattr(device_settings, "measures_device_settings", lambda config: True)
    monkeypatch.setattr(device_settings, "measure_step_rates", lambda c, d, candidates: RATES)
    monkeypatch.setattr(device_settings.torch.cuda, "get_device_name", lambda: "Test GPU")
    monkeypatch.setattr(device_settings, "half_precision", lambda: "bf16-mixed")
    timed = []

    def measure_throughput(candidate, images, progress=False):
        timed.append((candidate.precision, candidate.channels_last))
        return budget.Throughput("cuda", 1000.0, 3000.0, checkpoint_s=0.1, measured_s=1.0)

    monkeypatch.setattr(budget, "measure_throughput", measure_throughput)
    config = FinetuneConfig(
        data_dir=str(colour_folder), budget="1m", **{**TINY_CONFIG, "strategy": "auto"}
    )
    resolved, record = auto.resolve_auto(config, progress=False)
    assert timed and set(timed) == {("32", False)}
    assert (resolved.precision, resolved.channels_last) == ("32", False)
    assert record["device_settings"]["precision"] == "32"
