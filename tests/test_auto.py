"""`--strategy auto`: each decision rule on synthetic evidence, and one measured run: explicit
flags win, the decision is recorded (log, config.yaml, auto.json, summary.json, report) and a
resumed run repeats it without measuring again."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml

from tlkit.cli import main
from tlkit.config import FIXED_CHOICES, FinetuneConfig
from tlkit.errors import ConfigError
from tlkit.runfolder import read_summary
from tlkit.train import auto
from tlkit.train.auto import Evidence, choose_input_size, decide, schedule_epochs
from tlkit.train.finetune import finetune

# conftest's TINY_CONFIG without its named strategy
TINY_AUTO = dict(pretrained="bundled", batch_size=8, num_workers=0, val_fraction=0.3)
ALL_OPEN = ["strategy", *(name for name in FIXED_CHOICES if name != "strategy")]


def evidence(**values) -> Evidence:
    """Fashion-MNIST-like evidence: 5,000 images of 10 classes, 28px sources, probe 0.85."""
    defaults = dict(
        classes=10,
        train_images=5000,
        images_per_class_min=480,
        images_per_class_median=500,
        source_short_side_median=28,
        pretrained_input_size=224,
        backbone_stages=8,
        input_size=64,
        linear_val_acc=0.85,
        knn_val_acc=0.82,
        probe_seconds=1.0,
    )
    return Evidence(**{**defaults, **values})


def chosen(choices) -> dict:
    return {name: choice.value for name, choice in choices.items()}


@pytest.mark.parametrize(
    "values, strategy, stages",
    [
        ({"images_per_class_median": 39}, "features", None),  # too few to fine-tune
        ({"linear_val_acc": 0.97}, "features", None),  # frozen features solve it
        ({"images_per_class_median": 399}, "partial", 1),
        ({}, "partial", 2),
        ({"images_per_class_median": 1000, "backbone_stages": 1}, "partial", 1),
        ({"images_per_class_median": 5000}, "full", None),
        ({"images_per_class_median": 5000, "linear_val_acc": None}, "full", None),
    ],
)
def test_strategy_by_images_per_class_and_probe(values, strategy, stages):
    choices = chosen(decide(evidence(**values), ALL_OPEN))
    assert choices["strategy"] == strategy
    assert choices.get("unfreeze_stages") == stages
    assert choices["lp_ft"] is False  # measured worse than a zero head; --lp-ft turns it on


@pytest.mark.parametrize(
    "values, scale",
    [
        ({}, 1.0),  # partial: its last stages at the head's rate
        ({"images_per_class_median": 5000}, 0.1),  # full: early layers at a tenth
        ({"images_per_class_median": 10}, 0.1),  # features: nothing pretrained trains
    ],
)
def test_backbone_learning_rate_by_strategy(values, scale):
    assert chosen(decide(evidence(**values), ALL_OPEN))["backbone_lr_scale"] == scale
    given = ["strategy", "unfreeze_stages"]  # --backbone-lr-scale given: kept
    assert "backbone_lr_scale" not in decide(evidence(**values), given)


def test_a_negative_backbone_learning_rate_is_refused():
    with pytest.raises(ConfigError, match="backbone_lr_scale=-0.1"):
        FinetuneConfig(data_dir="x", backbone_lr_scale=-0.1)


def test_no_lp_ft_for_a_head_with_a_hidden_layer():
    assert chosen(decide(evidence(), ALL_OPEN, linear_head=False))["lp_ft"] is False


@pytest.mark.parametrize(
    "train_images, strategy, epochs",
    [
        (5000, "partial", 4),  # HyperRule's 500 x 512 images, 8%: 20,480 images seen
        (500, "partial", 30),  # capped
        (19_999, "partial", 3),  # the floor
        (20_000, "full", 20),  # HyperRule's next regime: 10,000 steps
        (54_000, "full", 8),  # 10,000 x 512 x 0.08 / 54,000
        (5000, "features", 10),  # cached epochs are cheap
        (2_000_000, "full", 3),
    ],
)
def test_schedule_follows_the_hyperrule_scaled_for_cpu(train_images, strategy, epochs):
    assert schedule_epochs(train_images, strategy).value == epochs


@pytest.mark.parametrize(
    "side, pretrained, fixed, size",
    [
        (28, 224, False, 64),  # Fashion-MNIST: 2x is 56, a multiple of 32
        (8, 224, False, 64),  # digits: at least 64
        (50, 224, False, 128),
        (112, 224, False, 224),  # 2x reaches the pretrained size
        (400, 224, False, 224),
        (None, 224, False, 224),  # no readable header
        (28, 384, True, 384),  # a model built for one size
    ],
)
def test_input_size_by_source_size(side, pretrained, fixed, size):
    assert choose_input_size(side, pretrained, fixed).value == size


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, {"augment": False, **auto.GENTLE_CROPS}),  # small data; 28px sources < 64px
        ({"train_images": 20_000}, {"augment": True, **auto.GENTLE_CROPS}),
        (
            {"train_images": 20_000, "source_short_side_median": 300, "input_size": 224},
            {"augment": True, **auto.IMAGENET_CROPS},
        ),
        ({"source_short_side_median": None}, {"augment": False, **auto.IMAGENET_CROPS}),
    ],
)
def test_augmentation_by_data_size_and_source_size(values, expected):
    choices = chosen(decide(evidence(**values), ALL_OPEN))
    assert {name: choices[name] for name in expected} == expected


def test_only_open_choices_are_made_and_given_stages_mean_partial():
    given_epochs = chosen(decide(evidence(), ["strategy", "unfreeze_stages", "augment"]))
    assert given_epochs == {"strategy": "partial", "unfreeze_stages": 2, "augment": False}
    given_augment = chosen(decide(evidence(), ["short_side_min", "short_side_max"]))
    assert given_augment == {"short_side_min": 224, "short_side_max": 288}
    few = evidence(images_per_class_median=10)
    assert chosen(decide(few, ["strategy", "epochs"])) == {"strategy": "partial", "epochs": 4}


def test_print_config_shows_what_auto_leaves_open_and_a_named_strategy_fixes(capsys):
    assert main(["finetune", "--epochs", "3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["strategy"] == "auto" and printed["epochs"] == 3
    assert all(printed[name] is None for name in ALL_OPEN if name not in ("strategy", "epochs"))
    assert main(["finetune", "--strategy", "full", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    fixed = {name: value for name, value in FIXED_CHOICES.items() if value is not None}
    assert {name: printed[name] for name in fixed} == {**fixed, "strategy": "full"}
    assert printed["img_size"] == 224


class StopAfterFirstEpoch(pl.Callback):
    """Ends training after one epoch, as an interrupted run would have stopped."""

    def on_train_epoch_end(self, trainer, module) -> None:
        trainer.should_stop = True


def test_auto_run_keeps_given_values_records_its_decision_and_resumes_without_measuring(
    colour_folder: Path, tmp_path: Path, monkeypatch, caplog
):
    out = tmp_path / "run"
    given = {"epochs": 2, "short_side_max": 300}  # no strategy: auto
    config = FinetuneConfig(data_dir=str(colour_folder), out=str(out), **given, **TINY_AUTO)
    with caplog.at_level("INFO", logger="tlkit"):
        finetune(config, enable_progress_bar=False, callbacks=[StopAfterFirstEpoch()])
    assert "Auto evidence: 20 train images, 3 classes" in caplog.text

    decision = json.loads((out / "auto.json").read_text())
    assert decision["evidence"]["source_short_side_median"] == 40
    assert decision["choices"]["strategy"]["value"] == "features"  # 7 images per class
    assert decision["choices"]["img_size"]["value"] == 96  # 2 x 40px, rounded up to 32
    assert decision["given"] == ["epochs", "short_side_max"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["strategy"] == "features" and saved["img_size"] == 96
    assert saved["epochs"] == 2 and saved["short_side_max"] == 300  # given: kept
    assert None not in saved.values()  # every choice resolved: --resume repeats them
    summary = read_summary(out)
    assert summary.auto_decision == decision and summary.strategy == "features"

    def no_measuring(*arguments, **options):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(auto, "measure", no_measuring)
    assert main(["finetune", "--resume", "--out", str(out)]) == 0
    resumed = read_summary(out)
    assert resumed.resumed and resumed.epochs_run == 2
    assert resumed.auto_decision == decision
    # From Python, with the auto config itself: the recorded choices, not new measurements
    again = finetune(config, resume=True, enable_progress_bar=False)
    assert again.strategy == "features" and again.preprocessing.input_size == 96

    from tlkit.commands.report import auto_decision_rows, build_report

    rows = auto_decision_rows(resumed.auto_decision)
    assert ("chose strategy", "features", "7 images per class: too few to fine-tune") in rows
    page = build_report(out, out=tmp_path / "report", mistakes=0).page.read_text()
    assert "How auto decided" in page and "too few to fine-tune" in page
