"""The task table (model/tasks.py) and the metrics' one definition (tlkit/metrics.py)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, f1_score
from torchmetrics.functional.classification import multiclass_recall

from tlkit.config import FinetuneConfig
from tlkit.data.labels import LABEL_KINDS, BatchCollator, class_balanced_weights, class_counts
from tlkit.errors import ConfigError, DatasetError
from tlkit.infer.export import inference_network
from tlkit.metrics import (
    ConfusionMatrixScore,
    PredictionsAndTargets,
    classification_metrics,
    f1_optimal_thresholds,
    multilabel_metrics,
)
from tlkit.model.classifier import TransferClassifier
from tlkit.model.tasks import CLASS_WEIGHTS, TASKS, resolve_monitor
from tlkit.runfolder import DataFacts
from tlkit.train.build import initial_bias


def tiny_model(task: str, classes: int = 4) -> TransferClassifier:
    return TransferClassifier(classes, "test_resnet", "none", img_size=32, task=task).eval()


@pytest.mark.parametrize(
    "task, targets, expected",
    [
        ("single-label", torch.tensor([0, 3, 1, 2, 2]), math.log(4)),
        (
            "multi-label",
            torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]).float(),
            math.log(2),
        ),
    ],
)
def test_a_zero_head_starts_at_the_tasks_loss_at_init(task, targets, expected):
    model = tiny_model(task)
    images = torch.randn(len(targets), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model.loss(model(images), targets, training=False)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_multi_label_sigmoids_start_at_each_labels_training_rate():
    """The head's bias starts each sigmoid at its label's rate (smoothed by half an image), so
    the loss at initialisation is the binary cross-entropy of those rates, below ln 2; a label
    on none or all of the images stays finite. Single-label heads start at zero."""
    counts, images = [1, 10, 99, 0], 100
    bias = TASKS["multi-label"].initial_bias(counts, images)
    rates = torch.sigmoid(torch.tensor(bias))
    assert rates.tolist() == pytest.approx([1.5 / 101, 10.5 / 101, 99.5 / 101, 0.5 / 101])
    assert TASKS["single-label"].initial_bias(counts, images) is None
    model = TransferClassifier(
        4, "test_resnet", "none", img_size=32, task="multi-label", initial_bias=bias
    ).eval()
    targets = torch.zeros(images, 4)
    for label, count in enumerate(counts):
        targets[:count, label] = 1
    inputs = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model.loss(model(inputs), targets, training=False).item()
    expected = F.binary_cross_entropy(rates.expand(images, -1), targets).item()
    assert loss == pytest.approx(expected, abs=1e-6) and loss < 0.2 < math.log(2)
    # reweighted classes: the weighted loss is lowest at equal odds, so the head starts there
    facts = DataFacts(["a", "b", "c", "d"], "multi-label", {"train": images}, {"train": counts})
    config = FinetuneConfig(data_dir="x")
    assert initial_bias(config, facts) == pytest.approx(bias)
    for reweighted in ({"class_weights": "balanced"}, {"sampling": "balanced"}):
        assert initial_bias(dataclasses.replace(config, **reweighted), facts) is None
    with pytest.raises(ConfigError, match="3 initial biases for 4 classes"):
        TransferClassifier(4, "test_resnet", "none", img_size=32, initial_bias=bias[:3])


def test_the_activation_is_the_tasks_and_the_export_ends_with_it():
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, layer in (("single-label", torch.nn.Softmax), ("multi-label", torch.nn.Sigmoid)):
        model = tiny_model(name)
        with torch.no_grad():
            model.head.classifier.weight.normal_()
            logits, probabilities = model(images), model.predict_batch(images)
            network = inference_network(model.backbone, model.head, model.task)
            assert isinstance(network[-1], layer)
            assert torch.allclose(network(images), probabilities, atol=1e-6)
        if name == "single-label":
            assert torch.allclose(probabilities, logits.softmax(-1))
            assert torch.allclose(probabilities.sum(-1), torch.ones(3))
        else:
            assert torch.allclose(probabilities, logits.sigmoid())
            assert not torch.allclose(probabilities.sum(-1), torch.ones(3))


def test_the_monitored_metric_follows_the_task_and_the_class_ratio():
    assert resolve_monitor("single-label", "auto", 2.0).value == "acc"
    assert resolve_monitor("single-label", "auto", 10.0).value == "balanced_acc"
    assert resolve_monitor("single-label", "auto", None).value == "acc"  # counts unknown
    assert resolve_monitor("multi-label", "auto", 10.0).value == "map"
    assert resolve_monitor("single-label", "macro_f1", 1.0).value == "macro_f1"
    with pytest.raises(ConfigError, match="not a single-label metric"):
        resolve_monitor("single-label", "map", 1.0)
    # the metrics a task can monitor are the ones its model logs for validation
    model = tiny_model("single-label")
    assert {f"val_{name}" for name in model.task.monitorable} <= set(model.metrics)


def test_balanced_class_weights_are_inverse_frequency_and_negatives_over_positives():
    counts, images = [10, 90], 100
    single = CLASS_WEIGHTS["balanced"](TASKS["single-label"], counts, images)
    assert single == pytest.approx([100 / (2 * 10), 100 / (2 * 90)])  # scikit-learn's rule
    assert CLASS_WEIGHTS["balanced"](TASKS["multi-label"], counts, images) == pytest.approx(
        [90 / 10, 10 / 90]
    )
    assert CLASS_WEIGHTS["none"](TASKS["single-label"], counts, images) is None
    model = TransferClassifier(2, "test_resnet", "none", img_size=32, loss_weights=single)
    logits, targets = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 1, 1])
    weighted = F.cross_entropy(logits, targets, weight=torch.tensor(single))
    assert model.loss(logits, targets, training=True) == pytest.approx(weighted.item())
    assert model.loss(logits, targets, training=False) == pytest.approx(
        F.cross_entropy(logits, targets).item()  # validation loss: unweighted
    )


def test_labels_are_read_counted_and_batched_by_their_kind():
    single, multi = LABEL_KINDS["single-label"], LABEL_KINDS["multi-label"]
    assert multi.names_of(" cat; dog ;") == ["cat", "dog"] and multi.names_of("") == []
    assert multi.from_indices([2, 0, 2]) == (0, 2)
    assert BatchCollator("multi-label", 3)([(torch.zeros(1), (0, 2)), (torch.ones(1), ())])[
        1
    ].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert BatchCollator("single-label", 3)([(torch.zeros(1), 2)])[1].tolist() == [2]
    assert multi.convert([("a.png", 1)], "x") == [("a.png", (1,))]
    assert single.convert([("a.png", (2,))], "x") == [("a.png", 2)]
    with pytest.raises(DatasetError, match="has 2 labels"):
        single.convert([("a.png", (0, 2))], "data.csv")
    labels = [(0,), (0, 1), (0,), ()]
    assert class_counts(labels, 3) == [3, 1, 0]
    assert class_balanced_weights(labels, 3) == pytest.approx([1 / 3, 1, 1 / 3, 1])


def test_balanced_accuracy_and_macro_f1_leave_out_a_class_without_images():
    """One definition: training's epoch metric (fed batch by batch) equals evaluate's, and a
    class without images is named and left out, as scikit-learn's balanced accuracy does;
    torchmetrics' macro recall would count it as 0 once it is predicted."""
    classes = ["a", "b", "c", "absent"]
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    predicted = torch.tensor([0, 3, 0, 1, 0, 2, 2, 3, 2, 1])  # "absent" predicted twice
    logits = F.one_hot(predicted, 4).float() * 5
    evaluation = classification_metrics(logits.softmax(-1), labels, classes)
    expected = balanced_accuracy_score(labels.numpy(), predicted.numpy())
    assert evaluation.balanced_accuracy == pytest.approx(expected)
    assert evaluation.macro_f1 == pytest.approx(
        f1_score(labels.numpy(), predicted.numpy(), labels=[0, 1, 2], average="macro")
    )
    assert evaluation.absent_classes == ["absent"]
    assert evaluation.summary()["per_class"]["absent"]["recall"] is None
    assert float(multiclass_recall(logits, labels, 4, average="macro")) != pytest.approx(expected)
    for name, value in (("balanced_acc", expected), ("macro_f1", evaluation.macro_f1)):
        epoch = ConfusionMatrixScore(4, name)
        for batch in (slice(0, 4), slice(4, 10)):
            epoch.update(logits[batch], labels[batch])
        assert float(epoch.compute()) == pytest.approx(value)


def test_multi_label_metrics_and_thresholds():
    classes = ["a", "b", "never"]
    probabilities = torch.tensor(
        [[0.9, 0.5, 0.1], [0.6, 0.7, 0.3], [0.4, 0.8, 0.2], [0.1, 0.35, 0.6], [0.7, 0.1, 0.1]]
    )
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])
    at_half = multilabel_metrics(probabilities, targets, classes)
    # a: AP 1 (its 3 images rank first); b: ranked +, +, -, +, -: precisions 1, 1, 3/4
    assert at_half.mean_average_precision == pytest.approx((1 + (1 + 1 + 0.75) / 3) / 2)
    assert at_half.absent_classes == ["never"]
    assert at_half.per_class[2].average_precision is None and at_half.per_class[2].predicted == 1
    # at 0.5: a right everywhere; b given to image 0 (p 0.5) and missed in image 3; "never"
    # given to image 3
    assert at_half.exact_match == pytest.approx(3 / 5)
    assert at_half.macro_f1 == pytest.approx((1 + 2 / 3) / 2)  # "never" left out
    assert at_half.micro_f1 == pytest.approx(2 * 5 / (7 + 6))
    thresholds = f1_optimal_thresholds(probabilities, targets)
    # midway between the lowest score accepted (a: 0.6, b: 0.35) and the next lower (0.4, 0.1);
    # no positives: the default
    assert thresholds == pytest.approx([0.5, 0.225, 0.5])
    tuned = multilabel_metrics(probabilities, targets, classes, thresholds)
    assert tuned.per_class[1].f1 == pytest.approx(6 / 7)  # P 3/4, R 1
    # training's gathered predictions give the same numbers
    gathered = PredictionsAndTargets()
    gathered.update(probabilities[:2], targets[:2])
    gathered.update(probabilities[2:], targets[2:])
    again = multilabel_metrics(*gathered.compute(), classes, thresholds)
    assert again.scores() == pytest.approx(tuned.scores())
    # under DDP torchmetrics syncs the lists into one tensor before computing (here one
    # process's gather, as torch.distributed's would return it)
    synced = PredictionsAndTargets(
        dist_sync_fn=lambda tensor, group=None: [tensor], distributed_available_fn=lambda: True
    )
    synced.update(probabilities[:2], targets[:2])
    synced.update(probabilities[2:], targets[2:])
    assert multilabel_metrics(*synced.compute(), classes, thresholds).scores() == pytest.approx(
        tuned.scores()
    )


def test_a_multi_label_model_keeps_its_thresholds_in_the_checkpoint(tmp_path):
    model = tiny_model("multi-label", classes=3)
    model.decision_thresholds = [0.2, 0.5, 0.7]
    assert model.thresholds == [0.2, 0.5, 0.7]
    model.optimizer_and_schedule(total_steps=10, steps_per_epoch=5)
    checkpoint = {
        "pytorch-lightning_version": "2.6.0",
        "epoch": 2,
        "global_step": 10,
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "m.ckpt")
    loaded = TransferClassifier.load_checkpoint(tmp_path / "m.ckpt")
    assert loaded.task.name == "multi-label" and loaded.thresholds == [0.2, 0.5, 0.7]
    assert tiny_model("multi-label", classes=3).thresholds == [0.5, 0.5, 0.5]
