"""A greedy soup of a run's best checkpoints: after training, the weights of the best epochs on
validation are averaged, best first, each added only where the monitored validation score does
not drop (Wortsman et al. 2022, "Model soups", Recipe 1; AutoGluon MultiModal's default over its
top 3 checkpoints). The soup takes best.ckpt's place; with one ingredient nothing changes.

`TopCheckpoints` (Lightning's ModelCheckpoint, weights alone) keeps the candidates during
training in the run's `soup/` folder; `make_soup` validates the soups with the run's own
Trainer (the metric, the DDP sync and the multi-label thresholds of every other validation),
writes the soup into best.ckpt and removes the folder. Lightning has no soup of its own (its
`WeightAveraging` averages along training, as `--ema` does), so the averaging is written here.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from tlkit.config import FinetuneConfig
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.model.classifier import THRESHOLDS_KEY, TransferClassifier
from tlkit.runfolder import read_checkpoint, write_checkpoint

logger = logging.getLogger(__name__)

SOUP_FOLDER = "soup"  # in the run folder while training: the candidates' weights


def soup_applies(config: FinetuneConfig) -> str | None:
    """Why a run makes no soup (None: it makes one of up to `config.soup` checkpoints)."""
    if config.soup < 2:
        return "--soup 1"
    if config.ema:
        return "--ema averages the weights already"
    if config.strategy == "features":
        return "the features strategy trains the head alone (the linear probe competes instead)"
    if config.dist_strategy == "fsdp":
        return "FSDP shards the weights"
    return None


class TopCheckpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint keeping the weights alone of the `k` best epochs on the
    monitored metric: the soup's candidates."""

    def __init__(self, dirpath: Path, monitor: str, k: int) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="epoch{epoch}",
            monitor=monitor,
            mode="max",
            save_top_k=k,
            save_weights_only=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:
        # distinct from best.ckpt's ModelCheckpoint, which monitors the same metric
        return f"{type(self).__qualname__}{{'monitor': {self.monitor!r}, 'k': {self.save_top_k}}}"


def average_weights(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the floating-point tensors (BatchNorm's running statistics
    included); the others (BatchNorm's batch counters) from the first state dict."""
    first = state_dicts[0]
    return {
        name: (
            torch.stack([weights[name].float() for weights in state_dicts])
            .mean(dim=0)
            .to(tensor.dtype)
            if tensor.is_floating_point()
            else tensor
        )
        for name, tensor in first.items()
    }


def make_soup(
    trainer: pl.Trainer,
    model: TransferClassifier,
    datamodule: pl.LightningDataModule,
    monitored: str,
) -> dict[str, Any] | None:
    """The greedy soup of the candidates `TopCheckpoints` kept, starting from best.ckpt and its
    recorded score: each other candidate, best first, is averaged in if the soup with it
    validates at least as well (ties: the soup, as in Wortsman et al.). A soup of more than one
    checkpoint is written into best.ckpt (its weights, and multi-label thresholds chosen on its
    validation probabilities). Returns the record (every candidate tried, the epochs averaged,
    the monitored score before and after, the soup's validation metrics, the seconds); None
    where the run kept no other candidate."""
    top = next((item for item in trainer.callbacks if isinstance(item, TopCheckpoints)), None)
    best = trainer.checkpoint_callback
    if top is None or best is None or not best.best_model_path or best.best_model_score is None:
        return None
    started = time.perf_counter()
    best_checkpoint = read_checkpoint(best.best_model_path)
    ingredients = [best_checkpoint["state_dict"]]
    epochs = [best_checkpoint["epoch"] + 1]
    score = before = float(best.best_model_score)
    validated: dict[str, float] = {}
    thresholds = best_checkpoint.get(THRESHOLDS_KEY)
    tried: list[dict[str, Any]] = []
    loggers = trainer.loggers
    trainer.loggers = []  # the soups' validations stay out of metrics.csv
    try:
        for candidate_score, candidate in _candidates(top, besides=epochs[0]):
            model.load_state_dict(average_weights([*ingredients, candidate["state_dict"]]))
            with expected_lightning_warnings_hidden():
                metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
            with_it = float(metrics[monitored])
            kept = with_it >= score
            epoch = candidate["epoch"] + 1
            tried.append(
                {
                    "epoch": epoch,
                    "val": candidate_score,
                    "soup_val": round(with_it, 4),
                    "kept": kept,
                }
            )
            if kept:
                ingredients.append(candidate["state_dict"])
                epochs.append(epoch)
                score, validated = with_it, metrics
                thresholds = model.decision_thresholds
    finally:
        trainer.loggers = loggers
    if trainer.is_global_zero:
        if len(ingredients) > 1:
            best_checkpoint["state_dict"] = average_weights(ingredients)
            if thresholds is not None:
                best_checkpoint[THRESHOLDS_KEY] = [float(value) for value in thresholds]
            write_checkpoint(best.best_model_path, best_checkpoint)
        shutil.rmtree(top.dirpath, ignore_errors=True)
    trainer.strategy.barrier()  # every process tests the checkpoint as written
    if not tried:
        return None
    record = {
        "metric": monitored,
        "candidates": tried,
        "epochs": epochs,
        "val_before": round(before, 4),
        "val_after": round(score, 4),
        "val_metrics": validated,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if trainer.is_global_zero:
        soups = ", ".join(
            f"epoch {item['epoch']} {item['soup_val']:.4f} ({'kept' if item['kept'] else 'left'})"
            for item in tried
        )
        logger.info(
            f"Soup on validation {monitored}: best.ckpt (epoch {epochs[0]}) {before:.4f}, "
            f"averaged with {soups}; best.ckpt holds "
            + (f"the average of epochs {', '.join(map(str, epochs))}" if validated else "its own")
            + f" ({record['seconds']:.0f} s)"
        )
    return record


def _candidates(top: TopCheckpoints, besides: int) -> list[tuple[float, dict[str, Any]]]:
    """The other candidates (score, checkpoint) than epoch `besides`, best first, at most
    k - 1 of them (a resumed run's earlier ones may have been removed)."""
    candidates = []
    ranked = sorted(top.best_k_models.items(), key=lambda item: float(item[1]), reverse=True)
    for path, score in ranked:
        if Path(path).is_file() and len(candidates) < top.save_top_k - 1:
            checkpoint = read_checkpoint(path)
            if checkpoint["epoch"] + 1 != besides:
                candidates.append((round(float(score), 4), checkpoint))
    return candidates
