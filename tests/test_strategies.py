import math
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tlkit.model.backbones import layer_groups
from tlkit.model.classifier import TransferClassifier
from tlkit.model.heads import ClassifierHead


def make_model(strategy: str, unfreeze_stages: int = 2, **options) -> TransferClassifier:
    options.setdefault("pretrained", "bundled")
    return TransferClassifier(
        num_classes=4, strategy=strategy, unfreeze_stages=unfreeze_stages, img_size=32, **options
    )


def tiny_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(16, 3, 32, 32, generator=generator)
    labels = torch.arange(16) % 4
    dataset = TensorDataset(images, labels)
    return DataLoader(dataset, batch_size=8), DataLoader(dataset, batch_size=8)


def frozen_batchnorms(model: TransferClassifier) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.backbone.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        and not any(p.requires_grad for p in module.parameters())
    }


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("hidden", [0, 256])
def test_loss_at_initialisation_is_log_of_class_count(classes: int, hidden: int):
    torch.manual_seed(0)
    head = ClassifierHead(1280, classes, dropout=0.5, hidden=hidden).eval()
    features = torch.randn(512, 1280).relu()  # pooled post-activation features are >= 0
    labels = torch.randint(0, classes, (512,))
    loss = F.cross_entropy(head(features), labels)
    assert loss.item() == pytest.approx(math.log(classes), abs=0.05)


def test_features_strategy_trains_only_the_head():
    model = make_model("features")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if name.startswith("head.")}


def test_partial_strategy_trains_the_last_groups_and_the_head():
    model = make_model("partial", unfreeze_stages=2)
    groups = layer_groups(model.backbone)
    expected = {f"backbone.{name}" for group in groups[-2:] for name in group}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected | {n for n, _ in model.named_parameters() if n.startswith("head.")}


def test_full_strategy_trains_everything_with_a_lower_backbone_lr():
    model = make_model("full", lr=1e-2, backbone_lr_scale=0.1)
    assert all(p.requires_grad for p in model.parameters())
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=1,
        limit_val_batches=0,
    )
    trainer.fit(model, *tiny_loaders())
    optimizer = trainer.optimizers[0]
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for group in optimizer.param_groups:
        is_backbone = id(group["params"][0]) in backbone_ids
        assert group["initial_lr"] == pytest.approx(1e-3 if is_backbone else 1e-2)
    optimised = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert optimised == sum(p.numel() for p in model.parameters())


def test_only_trainable_parameters_reach_the_optimiser():
    model = make_model("features")
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=1,
        limit_val_batches=0,
    )
    trainer.fit(model, *tiny_loaders())
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.head.parameters()}


def test_unfreeze_stages_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="between 1 and 8"):
        make_model("partial", unfreeze_stages=9)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_model("most")


class AssertFrozenInEval(pl.Callback):
    """Checks at every training step (so also after each validation) that frozen BN is in eval."""

    def __init__(self) -> None:
        self.checked_steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        assert all(not bn.training for bn in frozen_batchnorms(module).values())
        self.checked_steps += 1


@pytest.mark.parametrize("strategy", ["features", "partial"])
def test_frozen_batchnorm_statistics_survive_training(strategy: str):
    torch.manual_seed(0)
    model = make_model(strategy, unfreeze_stages=1)
    frozen = frozen_batchnorms(model)
    assert frozen, "the strategy should freeze some BatchNorm layers"
    before = {name: bn.running_mean.clone() for name, bn in frozen.items()}
    trainable_bn = {
        name: module.running_mean.clone()
        for name, module in model.backbone.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d) and name not in frozen
    }
    check = AssertFrozenInEval()
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[check],
    )
    trainer.fit(model, *tiny_loaders())
    assert check.checked_steps == 4
    for name, bn in frozen_batchnorms(model).items():
        assert torch.equal(bn.running_mean, before[name]), name
    if strategy == "partial":  # the unfrozen stage's BatchNorm does adapt to the new data
        changed = [
            n
            for n, m in model.backbone.named_modules()
            if n in trainable_bn and not torch.equal(m.running_mean, trainable_bn[n])
        ]
        assert changed
    model.train()
    assert all(not bn.training for bn in frozen_batchnorms(model).values())


def test_scratch_training_uses_the_full_learning_rate_everywhere():
    model = make_model("full", pretrained="none", lr=1e-2, backbone_lr_scale=0.1)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=1,
        limit_val_batches=0,
    )
    trainer.fit(model, *tiny_loaders())
    assert {g["initial_lr"] for g in trainer.optimizers[0].param_groups} == {1e-2}


LAST_STAGE = {
    # family's tiny timm model -> what "the last stage" holds: its blocks and its output layers
    "test_efficientnet": (r"blocks\.4\.", r"conv_head\.", r"bn2\."),
    "mobilenetv3_small_050": (r"blocks\.4\.", r"blocks\.5\.", r"conv_head\."),
    "test_resnet": (r"layer4\.",),
    "regnetx_002": (r"s4\.",),
    "test_convnext": (r"stages\.3\.", r"head\.norm\."),
    "test_vit": (r"blocks\.5\.", r"norm\."),
}


@pytest.mark.parametrize("backbone", list(LAST_STAGE))
def test_unfreeze_one_stage_trains_the_last_real_stage_of_every_family(backbone: str):
    model = TransferClassifier(
        num_classes=3,
        backbone=backbone,
        pretrained="none",
        strategy="partial",
        unfreeze_stages=1,
    )
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    expected = {
        name
        for name, _ in model.backbone.named_parameters()
        if any(re.match(prefix, name) for prefix in LAST_STAGE[backbone])
    }
    assert trainable == expected
    size = model.preprocessing.input_size  # the backbone's own (ViTs have a fixed one)
    assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 3)
