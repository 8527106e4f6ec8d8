"""Transfer strategies: what trains, what stays frozen, and at which learning rate.

- ``features``: the backbone is frozen; only the new head trains (small data, similar domain).
- ``partial``: the last N layer groups of the backbone train with the head (more data).
- ``full``: everything trains; the pretrained backbone at ``lr * backbone_lr_scale`` (lots of data).

With a layer decay, the backbone's earlier layer groups train at geometrically lower rates
(`optimizer_parameter_groups`); frozen stages are the limit of that decay.

Frozen means frozen: ``requires_grad=False`` *and* the frozen modules in eval mode, so that
BatchNorm keeps its pretrained running statistics and frozen drop-path/dropout layers stay off.
`keep_frozen_modules_in_eval` must run after every ``.train()`` call; `TransferClassifier.train`
does that.

A strategy is one entry of `STRATEGIES`: its name and the function choosing the trainable
layer groups; a new one also needs its name in `config.TrainingStrategy` (the CLI's choices).
"""

from __future__ import annotations

from collections.abc import Callable

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from tlkit.config import TrainingStrategy
from tlkit.errors import ConfigError
from tlkit.model.backbones import layer_groups


def _head_only(groups: list[list[str]], unfreeze_stages: int) -> set[str]:
    return set()


def _last_stages(groups: list[list[str]], unfreeze_stages: int) -> set[str]:
    if not 1 <= unfreeze_stages <= len(groups):
        raise ConfigError(
            f"--unfreeze-stages must be between 1 and {len(groups)} for this backbone "
            f"(it has {len(groups)} layer groups, stem first), got {unfreeze_stages}"
        )
    return {name for group in groups[-unfreeze_stages:] for name in group}


def _all_stages(groups: list[list[str]], unfreeze_stages: int) -> set[str]:
    return {name for group in groups for name in group}


# Each strategy: (the backbone's layer groups, stem first; --unfreeze-stages) -> the names of
# the backbone parameters it trains. The keys are config.TrainingStrategy's choices (a test
# checks it); `auto` (tlkit/train/auto.py) resolves to one of them before a model is built.
STRATEGIES: dict[TrainingStrategy, Callable[[list[list[str]], int], set[str]]] = {
    "features": _head_only,
    "partial": _last_stages,
    "full": _all_stages,
}


def set_trainable(backbone: nn.Module, strategy: str, unfreeze_stages: int = 1) -> None:
    """Set `requires_grad` on the backbone's parameters according to the strategy."""
    trainable = trainable_parameter_names(backbone, strategy, unfreeze_stages)
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad = name in trainable


def trainable_parameter_names(
    backbone: nn.Module, strategy: str, unfreeze_stages: int = 1
) -> set[str]:
    """Names of the backbone parameters the strategy trains (all others are frozen)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy](layer_groups(backbone), unfreeze_stages)


def keep_frozen_modules_in_eval(module: nn.Module) -> None:
    """Put every sub-module whose parameters are all frozen in eval mode.

    A frozen BatchNorm in train mode would still overwrite its running statistics with those of
    the new data, silently changing the "frozen" features.
    """
    for child in module.modules():
        parameters = list(child.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            child.eval()


def optimizer_parameter_groups(
    backbone: nn.Module,
    head: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Optimiser groups for the trainable parameters only, the head's last; no weight decay on
    biases and norm layers (timm's convention).

    The head trains at `lr`, the backbone at `lr * backbone_lr_scale`. With `layer_decay` < 1,
    that is the rate of the backbone's last layer group, and each earlier group's is
    `layer_decay` times the next one's: timm's `param_groups_layer_decay` over the backbone's
    fine `group_matcher` groups (stem, then each block), whose `lr_scale` becomes the group's
    own `lr`, so every per-group schedule scales it. timm counts its classifier in the last
    group; the backbone has none (`num_classes=0`), so that group is the backbone's own last
    layers, and tlkit's head sits above it at the `1 / backbone_lr_scale` step. Frozen layers
    (`requires_grad=False`) are in no group: the limit of the decay, a learning rate of zero.
    """
    if layer_decay < 1.0:
        backbone_groups = param_groups_layer_decay(backbone, weight_decay, layer_decay=layer_decay)
    else:
        backbone_groups = param_groups_weight_decay(backbone, weight_decay)
    groups = []
    for group in backbone_groups:
        layer_scale = group.pop("lr_scale", 1.0)
        groups.append({**group, "lr": lr * backbone_lr_scale * layer_scale})
    for group in param_groups_weight_decay(head, weight_decay):
        groups.append({**group, "lr": lr})
    return groups


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
