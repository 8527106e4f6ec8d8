"""`finetune()`'s steps, each on its own: resume (the run folder), decide, the weights'
hash that the feature cache and auto's probe share, and the batches of an epoch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tlkit.config import FinetuneConfig
from tlkit.errors import OutputExistsError, RunFolderError
from tlkit.model import backbones
from tlkit.runfolder import AUTO_DECISION, DataFacts, read_config
from tlkit.train.build import build_model
from tlkit.train.features import cache_key
from tlkit.train.finetune import (
    RunFolder,
    decide,
    open_run_folder,
    training_batches_per_epoch,
)


def test_a_new_run_folder_has_nothing_to_resume(tmp_path: Path):
    config = FinetuneConfig(data_dir="data", out=str(tmp_path / "new"), strategy="features")
    assert open_run_folder(config, resume=False) == RunFolder(tmp_path / "new")


def test_a_finished_run_is_never_overwritten_and_a_new_one_cannot_be_resumed(
    tiny_run: Path, tmp_path: Path
):
    finished = FinetuneConfig(data_dir="data", out=str(tiny_run), strategy="features")
    with pytest.raises(OutputExistsError, match="--resume"):
        open_run_folder(finished, resume=False)
    empty = FinetuneConfig(data_dir="data", out=str(tmp_path), strategy="features")
    with pytest.raises(RunFolderError, match="nothing to resume"):
        open_run_folder(empty, resume=True)


def test_a_resumed_run_reads_its_checkpoint_metrics_and_split(tiny_run: Path):
    config = read_config(tiny_run)
    folder = open_run_folder(config, resume=True)
    assert folder.resume_from == str(tiny_run / "last.ckpt")
    assert folder.earlier_metrics and folder.recorded_split
    assert folder.auto_decision is None  # the tiny run named its strategy


def test_a_named_strategy_is_kept_as_it_is(tmp_path: Path):
    config = FinetuneConfig(data_dir="data", out=str(tmp_path), strategy="full", epochs=3)
    assert decide(config, RunFolder(tmp_path), progress=False) == (config, None)


def test_a_resumed_auto_run_repeats_its_recorded_choices_without_measuring(tiny_run: Path):
    recorded = read_config(tiny_run)
    decision = {"evidence": {}, "choices": {}, "given": []}
    auto = FinetuneConfig(data_dir=recorded.data_dir, out=str(tiny_run), strategy="auto")
    resolved, kept = decide(auto, RunFolder(tiny_run, auto_decision=decision), progress=False)
    assert kept is decision
    assert (resolved.strategy, resolved.unfreeze_stages, resolved.epochs) == (
        recorded.strategy,
        recorded.unfreeze_stages,
        recorded.epochs,
    )
    assert not (tiny_run / AUTO_DECISION).exists()  # nothing was measured or written


def test_pretrained_weights_are_hashed_once_per_source(monkeypatch):
    """Every split's cache key, and the measuring and the training model, share one hash."""
    hashed: list[int] = []
    hash_tensors = backbones._hash_tensors

    def counted(backbone):
        hashed.append(1)
        return hash_tensors(backbone)

    monkeypatch.setattr(backbones, "_hash_tensors", counted)
    monkeypatch.setattr(backbones, "_LOADED_DIGESTS", {})
    config = FinetuneConfig(pretrained="bundled", img_size=32, strategy="features")
    measuring, training = (
        build_model(config, DataFacts(["a", "b"])),
        build_model(config, DataFacts(["a", "b"])),
    )
    keys = {cache_key(model, [], "transform", 1, None) for model in (measuring, training)}
    keys |= {cache_key(training, [], "transform", 1, None) for _ in ("train", "val", "test")}
    assert len(keys) == 1 and len(hashed) == 1
    with backbones.torch.no_grad():  # an optimiser step changes the weights in place
        next(training.backbone.parameters()).add_(1.0)
    assert cache_key(training, [], "transform", 1, None) not in keys
    assert len(hashed) == 2


def test_the_logging_interval_counts_the_batches_of_one_process_epoch():
    """Lightning warns when an epoch holds fewer batches than the logging interval; the
    interval follows the batches one process trains on, after the processes' shares and
    `epoch_batches` (a budget's short epochs: 3 batches warned at an interval of 4)."""
    config = FinetuneConfig(data_dir="x", batch_size=64)
    assert training_batches_per_epoch(1000, config) == 15  # the incomplete 16th dropped
    assert training_batches_per_epoch(1000, replace(config, devices="2")) == 7  # 500 each
    assert training_batches_per_epoch(1000, replace(config, devices="0,1", num_nodes=2)) == 3
    assert training_batches_per_epoch(1000, replace(config, epoch_batches=3)) == 3
    assert training_batches_per_epoch(40, config) == 1  # one incomplete batch is kept
