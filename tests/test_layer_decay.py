"""Layer-wise learning-rate decay (`--layer-decay`): timm's layer groups for every backbone
family, frozen stages left out, the head at --lr, and the schedule scaling every group's rate."""

import pytest
import timm
import torch

from tlkit.config import FinetuneConfig
from tlkit.errors import ConfigError
from tlkit.model.classifier import TransferClassifier
from tlkit.model.heads import ClassifierHead
from tlkit.model.strategies import optimizer_parameter_groups, set_trainable

LR, SCALE, DECAY = 1e-2, 0.1, 0.5

# One small model per family timm's group_matcher knows (ResNet, EfficientNet, MobileNetV3,
# RegNet, ConvNeXt, ViT), built on the meta device: the groups need names and shapes only.
FAMILIES = {
    "test_resnet": {},
    "test_efficientnet": {},
    "mobilenetv3_small_050": {},
    "regnetx_002": {},
    "test_convnext": {},
    "test_vit": {"img_size": 32},
}


@pytest.mark.parametrize("strategy", ["full", "partial"])
@pytest.mark.parametrize("name", FAMILIES)
def test_each_earlier_layer_group_trains_at_the_decay_times_the_next(name: str, strategy: str):
    with torch.device("meta"):
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **FAMILIES[name])
        head = ClassifierHead(backbone.num_features, 3, dropout=0.0)
    set_trainable(backbone, strategy, unfreeze_stages=2)
    groups = optimizer_parameter_groups(backbone, head, LR, 1e-4, SCALE, layer_decay=DECAY)

    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(rate)  # no parameter in two groups
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    assert not any(id(p) in rate for p in frozen)  # frozen stages: the limit of the decay
    assert (len(frozen) > 0) == (strategy == "partial")
    assert all(rate[id(p)] == LR for p in head.parameters())  # the head keeps --lr

    # From the stem towards the output the rates never fall, and the distinct rates step up by
    # 1 / DECAY from group to group, up to lr x backbone_lr_scale for the last group.
    backbone_rates = [rate[id(p)] for _, p in trainable]
    assert len(backbone_rates) == len(trainable)
    assert all(a <= b for a, b in zip(backbone_rates, backbone_rates[1:], strict=False))
    steps = sorted(set(backbone_rates), reverse=True)
    assert steps[0] == pytest.approx(LR * SCALE)
    assert len(steps) >= 2
    assert [b / a for a, b in zip(steps, steps[1:], strict=False)] == pytest.approx(
        [DECAY] * (len(steps) - 1)
    )
    # ...one step per timm layer group (fine group_matcher) that trains
    fine = timm.models.group_parameters(backbone, backbone.group_matcher(), reverse=True)
    assert len(steps) == len({fine[n] for n, _ in trainable})
    # no weight decay on biases and norm layers, as without the decay
    assert all(group["weight_decay"] == 0 for group in groups if group["params"][0].ndim <= 1)


def test_without_decay_the_backbone_is_one_rate():
    with torch.device("meta"):
        backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
        head = ClassifierHead(backbone.num_features, 3, dropout=0.0)
    groups = optimizer_parameter_groups(backbone, head, LR, 1e-4, SCALE, layer_decay=1.0)
    assert [group["lr"] for group in groups] == [LR * SCALE] * 2 + [LR] * 2


def test_the_schedule_scales_every_groups_own_rate():
    model = TransferClassifier(
        3, backbone="test_resnet", pretrained="none", strategy="full", img_size=32, lr=LR,
        layer_decay=DECAY, warmup_epochs=1,
    )  # fmt: skip
    optimizer, schedule = model.optimizer_and_schedule(total_steps=20, steps_per_epoch=10)
    base = [group["initial_lr"] for group in optimizer.param_groups]
    assert len(set(base)) > 2  # several layer rates and the head's
    for _ in range(7):  # into the cosine decay (warm-up: 2 steps, 10% of the run)
        factors = {group["lr"] / group["initial_lr"] for group in optimizer.param_groups}
        assert max(factors) == pytest.approx(min(factors))
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[-1]["lr"] < LR


@pytest.mark.parametrize("values", [{"layer_decay": 0.0}, {"layer_decay": 1.5}])
def test_layer_decay_outside_0_1_is_refused(values):
    with pytest.raises(ConfigError, match="layer_decay"):
        FinetuneConfig(data_dir="x", img_size=32, **values)
