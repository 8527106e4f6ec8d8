"""benchmarks/epoch.py's instruments: its callback splits every epoch of a run into phases
that account for the epoch, and --profile leaves Lightning's profiler report in the run."""

import runpy
import time
from pathlib import Path

from conftest import TINY_CONFIG

from tlkit import FinetuneConfig

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "epoch.py"


def test_the_phases_account_for_every_epoch_and_the_profile_is_written(
    colour_folder: Path, tmp_path: Path
):
    epoch = runpy.run_path(str(BENCHMARK))
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        test_fraction=0.0,
        **{**TINY_CONFIG, "epochs": 2},
    )
    started = time.perf_counter()
    summary, phases = epoch["run_epochs"](config, profile=True)
    elapsed = time.perf_counter() - started

    assert len(phases) == len(summary.history) == 2
    for phase in phases:
        assert set(phase) == set(epoch["EpochPhases"].PHASES)
        assert phase["steps"] > 0 and phase["validation"] > 0
        assert all(seconds >= 0 for seconds in phase.values())
    # the epochs lie within the run, and each one at least as long as its summary line says
    assert sum(sum(phase.values()) for phase in phases) < elapsed
    for phase, record in zip(phases, summary.history, strict=True):
        assert sum(phase.values()) >= record["seconds"]
    report = (tmp_path / "run" / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "save_checkpoint" in report
