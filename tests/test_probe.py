import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG
from pytorch_lightning.callbacks import Callback
from torch import nn

from tlkit import FinetuneConfig, finetune
from tlkit.errors import ConfigError
from tlkit.train.build import build_datamodule, build_model, check_config
from tlkit.train.probe import (
    balanced_accuracy_bound,
    fit_probe,
    knn_accuracy_best_k,
    per_class_sample,
    probe_features,
)


def separable_features(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes of 64-d gaussian clusters, shifted and scaled per dimension as raw backbone
    features are (so that folding the standardisation into the head is exercised)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(count) % 3
    features = centres[labels] + torch.randn(count, 64, generator=generator)
    return features * torch.linspace(0.1, 10, 64) + 5.0, labels


def test_probe_separates_classes_and_its_folded_head_reproduces_its_predictions():
    train_x, train_y = separable_features(300, seed=1)
    val_x, val_y = separable_features(90, seed=2)
    result = fit_probe(train_x, train_y, val_x, val_y, num_classes=3)
    assert result.linear_val_acc >= 0.95 and result.knn_val_acc >= 0.95
    assert result.weight.shape == (3, 64) and result.bias.shape == (3,)
    head = nn.Linear(64, 3)
    with torch.no_grad():
        head.weight.copy_(result.weight)
        head.bias.copy_(result.bias)
    accuracy = (head(val_x).argmax(1) == val_y).float().mean().item()
    assert accuracy == result.linear_val_acc
    again = fit_probe(train_x, train_y, val_x, val_y, num_classes=3)
    assert torch.equal(again.weight, result.weight)  # deterministic: every DDP rank agrees


def test_knn_votes_of_the_nearest_neighbours_and_k_is_chosen_on_validation():
    # the nearest neighbour of the validation point is its class; the next three are not
    train_x = torch.tensor([[1.0, 0.0], [0.95, 0.30], [0.95, 0.32], [0.95, 0.34]])
    train_y = torch.tensor([0, 1, 1, 1])
    val_x, val_y = torch.tensor([[1.0, 0.1]]), torch.tensor([0])
    assert knn_accuracy_best_k(train_x, train_y, val_x, val_y, 2, (4,)) == (0.0, 4)
    assert knn_accuracy_best_k(train_x, train_y, val_x, val_y, 2, (1, 4)) == (1.0, 1)
    # counts above the training size are left out
    assert knn_accuracy_best_k(train_x, train_y, val_x, val_y, 2, (1, 50)) == (1.0, 1)


def test_a_dissimilar_neighbour_never_votes_against_its_class():
    """Raw cosine votes would let the opposite point (similarity -0.99) cancel its class's
    nearest neighbour; weighted by exp(similarity / T) it only adds a little to its class."""
    train_x = torch.tensor([[1.0, 0.05], [-1.0, 0.1], [0.1, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    val_x, val_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_accuracy_best_k(train_x, train_y, val_x, val_y, 2, (3,)) == (1.0, 3)


def test_the_balanced_accuracy_bound_accounts_for_the_validation_size():
    def bound(right: list[int], counts: list[int]) -> tuple[float, float]:
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        predicted = labels.clone()
        for label, hits in enumerate(right):  # the first `hits` of each class are right
            members = (labels == label).nonzero().flatten()
            predicted[members[hits:]] = 1 - label
        return balanced_accuracy_bound(predicted, labels, len(counts))

    assert bound([10, 10], [10, 10]) == (1.0, pytest.approx(0.898, abs=0.002))
    assert bound([100, 100], [100, 100]) == (1.0, pytest.approx(0.9885, abs=0.002))
    balanced, lower = bound([98, 0], [98, 2])  # the majority always: accuracy 0.98
    assert balanced == 0.5 and lower < 0.5


def test_noise_at_98_to_2_does_not_look_solved():
    """Pure-noise features at a 98:2 class ratio: the probe predicts the majority (accuracy
    0.98) and its balanced accuracy says so."""
    generator = torch.Generator().manual_seed(0)
    train_y = (torch.rand(500, generator=generator) < 0.02).long()
    val_y = torch.cat([torch.zeros(245, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    train_x, val_x = torch.randn(500, 32, generator=generator), torch.randn(250, 32)
    probe = fit_probe(train_x, train_y, val_x, val_y, num_classes=2)
    assert probe.linear_val_acc >= 0.97
    assert probe.balanced_acc < 0.6 and probe.balanced_lower_bound < 0.5


def test_a_small_validation_split_is_backed_by_cross_validation():
    train_x, train_y = separable_features(300, seed=1)
    val_x, val_y = separable_features(12, seed=2)
    probe = fit_probe(train_x, train_y, val_x, val_y, num_classes=3)
    assert probe.evidence == "5-fold cross-validation" and probe.evidence_images == 312
    assert probe.balanced_acc >= 0.95 and probe.balanced_lower_bound >= 0.9
    large = fit_probe(train_x, train_y, *separable_features(300, seed=2), num_classes=3)
    assert large.evidence == "validation" and large.evidence_images == 300


def test_the_probe_reads_a_seeded_sample_of_each_class(colour_folder: Path):
    config = FinetuneConfig(data_dir=str(colour_folder), augment=False, **TINY_CONFIG)
    images = build_datamodule(config)
    images.setup("fit")
    sample = per_class_sample(images.train_set, 3, seed=0)
    labels = [label for _, label in sample.samples]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert per_class_sample(images.train_set, 3, seed=0).samples == sample.samples
    assert per_class_sample(images.train_set, 100, seed=0) is images.train_set


def test_probe_features_come_from_the_features_strategy_cache(colour_folder: Path, tmp_path):
    config = FinetuneConfig(data_dir=str(colour_folder), augment=False, **TINY_CONFIG)
    images = build_datamodule(config)
    model = build_model(config, ["blue", "green", "red"])
    cache = tmp_path / "cache"
    train_x, train_y, val_x, val_y = probe_features(model, images, cache)
    assert train_x.shape == (len(images.train_set), 1280) and val_x.shape[0] == len(val_y)
    files = sorted(cache.glob("*.safetensors"))
    assert [path.name.split("-")[1] for path in files] == ["train", "val"]
    stamps = [path.stat().st_mtime_ns for path in files]
    again = probe_features(model, images, cache)
    assert [path.stat().st_mtime_ns for path in files] == stamps  # read, not extracted again
    assert torch.equal(again[0], train_x) and torch.equal(again[3], val_y)


class FirstStep(Callback):
    """Records the classifier before the first optimiser step, and that step's loss."""

    def on_train_batch_start(self, trainer, module, batch, batch_index: int) -> None:
        if trainer.global_step == 0:
            self.classifier = [p.detach().clone() for p in module.head.classifier.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index: int) -> None:
        if trainer.global_step == 1:
            self.loss = float(outputs["loss"])


@pytest.mark.parametrize("lp_ft", [True, False])
def test_lp_ft_starts_fine_tuning_from_the_probe_head(colour_folder: Path, tmp_path, lp_ft):
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        **{**TINY_CONFIG, "batch_size": 12},
        unfreeze_stages=1,
        augment=False,
        dropout=0.0,  # the first step's loss is then the head's own
        epochs=1,
        lp_ft=lp_ft,
    )
    first_step = FirstStep()
    summary = finetune(
        config, enable_progress_bar=False, callbacks=[first_step], limit_test_batches=0
    )
    weight, bias = first_step.classifier
    if not lp_ft:
        assert summary.linear_probe is None
        assert not weight.any() and not bias.any()
        assert first_step.loss == pytest.approx(math.log(3), abs=1e-4)
        return
    model = build_model(config, summary.classes)
    images = build_datamodule(config)
    probe = fit_probe(*probe_features(model, images, tmp_path / "run" / "cache"), num_classes=3)
    assert torch.equal(weight, probe.weight) and torch.equal(bias, probe.bias)
    assert first_step.loss < math.log(3)
    assert summary.linear_probe["linear_val_acc"] == round(probe.linear_val_acc, 4)


def test_lp_ft_refuses_the_features_strategy_and_a_hidden_head_layer(colour_folder: Path):
    for options in ({"strategy": "features"}, {"head_hidden": 16}):
        config = FinetuneConfig(data_dir=str(colour_folder), lp_ft=True, **options)
        with pytest.raises(ConfigError, match="--lp-ft"):
            check_config(config)
