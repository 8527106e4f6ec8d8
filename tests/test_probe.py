import math
from pathlib import Path

import torch
from conftest import TINY_CONFIG
from torch import nn

from tlkit import FinetuneConfig
from tlkit.finetune import build_datamodule, build_model
from tlkit.probe import fit_probe, knn_accuracy_best_k, probe_features


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
