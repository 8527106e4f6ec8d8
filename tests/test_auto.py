"""`--strategy auto`: each decision rule on synthetic evidence, and one measured run: explicit
flags win, the decision is recorded (log, config.yaml, auto.json, summary.json, report) and a
resumed run repeats it without measuring again."""

import dataclasses
import json
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml

from tlkit.cli import main
from tlkit.config import FIXED_CHOICES, FinetuneConfig
from tlkit.errors import ConfigError
from tlkit.runfolder import read_summary
from tlkit.train import auto, budget
from tlkit.train.auto import (
    Evidence,
    choose_input_size,
    decide,
    planned_images,
    step_down,
)
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
        val_images=1000,
        probe_balanced_acc=0.85,
        probe_balanced_lower_bound=0.83,
    )
    return Evidence(**{**defaults, **values})


FEW = auto.FEATURES_BELOW_PER_CLASS - 1  # images per class: the head alone trains


def chosen(choices) -> dict:
    return {name: choice.value for name, choice in choices.items()}


@pytest.mark.parametrize(
    "values, strategy, stages",
    [
        ({"images_per_class_median": FEW}, "features", None),  # too few to fine-tune
        ({"images_per_class_median": 9}, "partial", 1),  # the suite: fine-tuning pays at 9
        ({"probe_balanced_lower_bound": 0.97}, "features", None),  # frozen features solve it
        # 98:2 classes on noise: 0.98 accuracy, minority recall 0, balanced 0.5: not solved
        ({"linear_val_acc": 0.98, "probe_balanced_lower_bound": 0.45}, "partial", 2),
        ({"images_per_class_median": 399}, "partial", 1),
        ({}, "partial", 2),
        ({"images_per_class_median": 1000, "backbone_stages": 1}, "partial", 1),
        ({"images_per_class_median": 5000}, "full", None),
        ({"images_per_class_median": 5000, "probe_balanced_lower_bound": None}, "full", None),
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
        ({"images_per_class_median": FEW}, 0.1),  # features: nothing pretrained trains
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
    "train_images, strategy, device, passes",
    [
        (5000, "partial", "cpu", 4.1),  # HyperRule's 500 x 512 images, 8%: 20,480 images seen
        (500, "partial", "cpu", 30),  # capped
        (19_999, "partial", "cpu", 3),  # the floor
        (20_000, "partial", "cpu", 3),  # one more image: the same plan
        (54_000, "full", "cpu", 3),
        (5000, "features", "cpu", 10),  # cached epochs are cheap
        (5000, "partial", "cuda", 51.2),  # the rule itself on an accelerator
        (50_000, "partial", "cuda", 12.0),
        (2_000_000, "full", "cuda", 5.1),
    ],
)
def test_the_schedule_follows_a_continuous_hyperrule_by_device(
    train_images, strategy, device, passes
):
    planned = planned_images(train_images, strategy, device).value
    assert planned / train_images == pytest.approx(passes, abs=0.05)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_one_more_image_or_class_never_changes_the_planned_compute_by_more_than_a_few_percent(
    device,
):
    """The issue's cliffs: 19,999 -> 20,000 images, and 50 images per class for 10, 400 and
    500 classes (the compute is the images processed, the augmentation a choice on top). One
    more class of 50 images changes it by no more than the data grows (10% at 10 classes),
    plus a percent."""
    for images in [*range(500, 60_000, 499), 19_999, 499_999, 1_281_166, 5_000_000]:
        here = planned_images(images, "partial", device).value
        more = planned_images(images + 1, "partial", device).value
        assert abs(more - here) / here < 0.01, images
    for classes in (10, 399, 400, 499, 500):
        here = planned_images(50 * classes, "partial", device).value
        more = planned_images(50 * (classes + 1), "partial", device).value
        assert abs(more - here) / here <= 1 / classes + 0.01, classes


def test_a_plan_ending_part_way_through_a_pass_runs_as_shorter_epochs():
    splits = budget.Splits(train=5000, val=1000, test=0)
    schedule = budget.schedule_of(20_480, splits, batch_size=64)
    assert schedule.epochs == 5 and schedule.epoch_batches == 64  # 4.1 passes: 5 x 64 x 64
    assert schedule.images == 5 * 64 * 64
    whole = budget.schedule_of(15_000, splits, batch_size=64)
    assert (whole.epochs, whole.epoch_batches) == (3, 0)  # 3 passes: whole epochs


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
        ({}, {"augment": False, **auto.GENTLE_CROPS}),  # 4 passes; 28px sources < 64px
        ({"train_images": 500}, {"augment": True, **auto.GENTLE_CROPS}),  # 30 passes
        (
            {"train_images": 500, "source_short_side_median": 300, "input_size": 224},
            {"augment": True, **auto.IMAGENET_CROPS},
        ),
        ({"source_short_side_median": None}, {"augment": False, **auto.IMAGENET_CROPS}),
        ({"device": "cuda"}, {"augment": True, **auto.GENTLE_CROPS}),  # 51 passes
    ],
)
def test_augmentation_by_passes_over_the_data_and_source_size(values, expected):
    choices = chosen(decide(evidence(**values), ALL_OPEN))
    assert {name: choices[name] for name in expected} == expected


def test_only_choices_that_take_effect_are_logged():
    choices = decide(evidence(), ALL_OPEN)  # no augmentation: its crops do not apply
    assert not any(choices[name].applies for name in auto.GENTLE_CROPS)
    features = decide(evidence(images_per_class_median=FEW), ALL_OPEN)
    assert not features["backbone_lr_scale"].applies and not features["lp_ft"].applies
    assert not features["augment"].applies  # the head trains on one cached view


def test_lp_ft_given_keeps_auto_away_from_features():
    choices = chosen(decide(evidence(images_per_class_median=FEW), ALL_OPEN, lp_ft=True))
    assert choices["strategy"] == "partial"
    solved = evidence(probe_balanced_lower_bound=0.99)
    assert chosen(decide(solved, ALL_OPEN, lp_ft=True))["strategy"] == "partial"


def test_a_budget_steps_down_stages_then_input_size_then_to_cached_features():
    config = FinetuneConfig(data_dir="x", strategy="full", img_size=224)
    steps, names = [], [*ALL_OPEN]
    found = evidence(input_size=224, source_short_side_median=300)
    while (lower := step_down(config, names, found)) is not None:
        changes, reason = lower
        steps.append(reason)
        config = FinetuneConfig(
            **{**config.__dict__, **changes, "unfreeze_stages": changes.get("unfreeze_stages", 1)}
        )
    assert steps == [
        "full did not fit: partial",
        "2 stages did not fit: 1",
        "224 px did not fit: 128 px",
        "128 px did not fit: 64 px",
        "partial did not fit: cached features",
    ]
    fixed = evidence(input_size=224, fixed_input_size=True)
    partial_one = FinetuneConfig(data_dir="x", strategy="partial", unfreeze_stages=1, img_size=224)
    assert step_down(partial_one, names, fixed)[0] == {"strategy": "features"}


def test_only_open_choices_are_made_and_given_stages_mean_partial():
    given_epochs = chosen(decide(evidence(), ["strategy", "unfreeze_stages", "augment"]))
    assert given_epochs == {"strategy": "partial", "unfreeze_stages": 2, "augment": False}
    given_augment = chosen(decide(evidence(), ["short_side_min", "short_side_max"]))
    assert given_augment == {"short_side_min": 224, "short_side_max": 288}
    few = evidence(images_per_class_median=FEW)
    assert chosen(decide(few, ["strategy", "epochs"])) == {
        "strategy": "partial",
        "epochs": 5,
        "epoch_batches": 64,
    }


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
    assert decision["choices"]["strategy"]["value"] == "partial"  # 7 images per class
    assert decision["choices"]["img_size"]["value"] == 96  # 2 x 40px, rounded up to 32
    assert decision["given"] == ["epochs", "short_side_max"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["strategy"] == "partial" and saved["img_size"] == 96
    assert saved["epochs"] == 2 and saved["short_side_max"] == 300  # given: kept
    assert None not in saved.values()  # every choice resolved: --resume repeats them
    summary = read_summary(out)
    assert summary.auto_decision == decision and summary.strategy == "partial"

    def no_measuring(*arguments, **options):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(auto, "measure", no_measuring)
    assert main(["finetune", "--resume", "--out", str(out)]) == 0
    resumed = read_summary(out)
    assert resumed.resumed and resumed.epochs_run == 2
    assert resumed.auto_decision == decision
    # From Python, with the auto config itself: the recorded choices, not new measurements
    again = finetune(config, resume=True, enable_progress_bar=False)
    assert again.strategy == "partial" and again.preprocessing.input_size == 96

    from tlkit.commands.report import auto_decision_rows, build_report

    rows = auto_decision_rows(resumed.auto_decision)
    reason = decision["choices"]["strategy"]["reason"]
    assert reason.startswith("7 images per class")
    assert ("chose strategy", "partial", reason) in rows
    page = build_report(out, out=tmp_path / "report", mistakes=0).page.read_text()
    assert "How auto decided" in page and "7 images per class" in page


def test_a_folder_and_its_converted_shards_decide_the_same(colour_folder: Path, tmp_path: Path):
    """The sources' sizes come from the scan for both (the conversion records them): the same
    evidence, the same choices."""
    from tlkit.data.shards import convert

    shards = convert(
        colour_folder, tmp_path / "shards", workers=1, progress=False, val_fraction=0.3
    )
    decisions = []
    for data in (colour_folder, shards.location):
        config = FinetuneConfig(data_dir=str(data), out=str(tmp_path / "run"), **TINY_AUTO)
        evidence, size, sized, _images = auto.measure(config, progress=False)
        assert sized == evidence.train_images  # every training image's size, from the scan
        measured = {**evidence.__dict__, "probe_seconds": None}
        decisions.append((measured, size, chosen(decide(evidence, ALL_OPEN))))
    assert decisions[0] == decisions[1]


NO_PROBE = dict(
    linear_val_acc=None,
    knn_val_acc=None,
    probe_seconds=None,
    probe_balanced_acc=None,
    probe_balanced_lower_bound=None,
)


def test_random_weights_train_every_layer_and_step_down_only_in_size():
    """--pretrained none: frozen random layers transfer nothing, so `full` at the head's rate
    whatever the data, the whole schedule (no early stop), and a budget steps down the input
    size, never the strategy."""
    for values in ({}, {"images_per_class_median": FEW}, {"images_per_class_median": 9}):
        scratch = evidence(pretrained=False, train_images=500, **values, **NO_PROBE)
        choices = chosen(decide(scratch, ALL_OPEN))
        assert (choices["strategy"], choices["backbone_lr_scale"]) == ("full", 1.0)
        assert "unfreeze_stages" not in choices
        # near chance on validation for many epochs first: the schedule runs to its end
        assert choices["patience"] == choices["epochs"] > FIXED_CHOICES["patience"]
    scratch = evidence(pretrained=False, **NO_PROBE)
    open_but_epochs = [name for name in ALL_OPEN if name != "epochs"]
    assert chosen(decide(scratch, open_but_epochs, given_epochs=50))["patience"] == 50
    assert chosen(decide(evidence(), ALL_OPEN))["patience"] == FIXED_CHOICES["patience"]
    config = FinetuneConfig(data_dir="x", strategy="full", img_size=128)
    scratch = evidence(pretrained=False, input_size=128, source_short_side_median=300)
    assert step_down(config, ALL_OPEN, scratch) == (
        {"strategy": "full", "img_size": 64},
        "128 px did not fit: 64 px",
    )
    smallest = FinetuneConfig(data_dir="x", strategy="full", img_size=64)
    assert step_down(smallest, ALL_OPEN, scratch) is None


def test_random_weights_are_not_probed(colour_folder: Path, tmp_path: Path, monkeypatch, caplog):
    def no_probe(*arguments, **options):
        raise AssertionError("random weights were probed")

    monkeypatch.setattr(auto, "probe_features", no_probe)
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        **{**TINY_AUTO, "pretrained": "none"},
    )
    with caplog.at_level("INFO", logger="tlkit"):
        resolved, record = auto.resolve_auto(config, progress=False)
    assert record["evidence"]["pretrained"] is False
    assert record["evidence"]["linear_val_acc"] is None
    assert (resolved.strategy, resolved.backbone_lr_scale) == ("full", 1.0)
    assert "no probe (random weights" in caplog.text
    assert "strategy = full" in caplog.text and "--pretrained none" in caplog.text
    from tlkit.commands.report import auto_decision_rows

    probe_row = next(row for row in auto_decision_rows(record) if row[0] == "linear probe / k-NN")
    assert probe_row[1] == "–" and "random weights" in probe_row[2]


def test_augmentation_follows_the_given_epochs_not_the_plan():
    # 5,000 images on a CPU: the plan makes about 4 passes, too few to augment
    open_but_epochs = [name for name in ALL_OPEN if name != "epochs"]
    assert chosen(decide(evidence(), ALL_OPEN))["augment"] is False
    long_run = decide(evidence(), open_but_epochs, given_epochs=30)["augment"]
    assert long_run.value is True and long_run.reason.startswith("30.0 passes")
    # a few images plan many passes; three given epochs are three passes (in whole batches)
    small = evidence(train_images=640, images_per_class_median=64, images_per_class_min=64)
    assert chosen(decide(small, ALL_OPEN))["augment"] is True
    short_run = decide(small, open_but_epochs, given_epochs=3)["augment"]
    assert short_run.value is False and short_run.reason.startswith("3.0 passes")
    # --epoch-batches given with --epochs: 30 epochs of 2 of 10 batches are 6 passes
    partial_passes = decide(
        small, open_but_epochs, given_epochs=30, given_epoch_batches=2, batch_size=64
    )["augment"]
    assert partial_passes.value is False and partial_passes.reason.startswith("6.0 passes")
    # fewer images than a batch: each epoch is one smaller batch, one pass
    tiny = evidence(train_images=40, images_per_class_median=4, images_per_class_min=4)
    one_batch = decide(tiny, open_but_epochs, given_epochs=25, batch_size=64)["augment"]
    assert one_batch.value is True and one_batch.reason.startswith("25.0 passes")


def test_a_budget_below_the_floor_of_passes_steps_down_the_input_size(
    colour_folder: Path, monkeypatch
):
    """At 224 px one pass fits the 2-minute budget and three do not: auto halves the input
    (where three fit) instead of fine-tuning for a pass and a half."""

    def measured(config, images):  # training and evaluation rates fall with the pixels
        scale = (64 / config.img_size) ** 2
        return budget.Throughput("cpu", 100.0 * scale, 300.0 * scale, 0.1, 1.0)

    monkeypatch.setattr(budget, "measure_throughput", measured)
    config = FinetuneConfig(
        data_dir=str(colour_folder / "train"), budget="2m", **{**TINY_AUTO, "img_size": None}
    )
    open_choices = ["strategy", *config.choices_left_to_auto()]
    facts = evidence(train_images=500, val_images=50, images_per_class_median=100, input_size=224)
    choices = decide(facts, open_choices, **auto.decide_options(config, open_choices))
    choices["img_size"] = auto.Choice(224, "the backbone's pretrained input size")
    images = auto.build_datamodule(dataclasses.replace(config, img_size=224, epochs=1))
    images.setup("fit")
    started = time.perf_counter()
    fitted, plan = auto.fit_to_budget(config, facts, choices, open_choices, images, started)
    assert plan["stepped_down"] == ["224 px did not fit: 128 px"] and plan["fits"]
    assert fitted["img_size"].value == 128 and fitted["strategy"].value == "partial"
    assert plan["schedule"]["images"] >= auto.MIN_EPOCHS * 500 * 0.9  # whole batches


def test_the_budget_leaves_room_for_the_tta_choice_of_the_augmentation_it_plans():
    """The TTA choice after training weighs flips and rescaled views only after augmented
    training: a budget whose passes turn augmentation off plans for the plain choice's
    views (none, ten-crop), a longer one for the augmented choice's."""
    throughput = budget.Throughput("cpu", 100.0, 300.0, checkpoint_s=0.1, measured_s=1.0)
    splits = budget.Splits(train=500, val=50, test=100)
    candidate = FinetuneConfig(data_dir="x", strategy="partial", img_size=64, augment=True)
    plain = budget.tta_choice_s(dataclasses.replace(candidate, augment=False), splits, throughput)
    augmented = budget.tta_choice_s(candidate, splits, throughput)
    assert plain < augmented
    for seconds, tta_s, augments in [(60, plain, False), (400, augmented, True)]:
        schedule, planned_tta_s, left = auto.plan_schedule(
            candidate, ALL_OPEN, 256_000, splits, throughput, seconds
        )
        assert planned_tta_s == tta_s and left == seconds - tta_s
        assert (schedule.images / splits.train >= auto.AUGMENT_FROM_EPOCHS) is augments
    given = auto.plan_schedule(candidate, ["epochs"], 256_000, splits, throughput, 60)
    assert given[1] == augmented  # --augment given: its views, whatever the passes
    epochs_given = [name for name in ALL_OPEN if name != "epochs"]
    given = auto.plan_schedule(candidate, epochs_given, 256_000, splits, throughput, 60)
    assert given[1] == augmented  # decided by the given epochs, which the run makes
