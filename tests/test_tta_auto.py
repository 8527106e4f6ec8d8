"""`--tta auto`: the preset chosen on the validation split when training ends, recorded in the
run folder and the export card, and used by evaluate, predict and report."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tlkit.cli import main
from tlkit.config import FinetuneConfig
from tlkit.infer import predict
from tlkit.infer.tta import (
    AUTO_CANDIDATES,
    can_be_outdone,
    candidate_plans,
    choose_preset,
    plan,
)
from tlkit.runfolder import SUMMARY, Preprocessing, read_config, read_summary
from tlkit.train.build import build_datamodule
from tlkit.train.finetune import choose_test_time_averaging

PREPROCESSING = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def hits(total: int, right: list[int]) -> torch.Tensor:
    correct = torch.zeros(total, dtype=torch.bool)
    correct[right] = True
    return correct


def test_a_costlier_preset_must_beat_the_noise_of_the_split():
    """400 images: ten-crop gets 20 more right and 5 fewer (z = 15 / sqrt(25) = 3): chosen;
    multi-scale then gains 4 of 16 disagreements over ten-crop (z = 1): ten-crop stays."""
    none = hits(400, list(range(300)))
    ten_crop = hits(400, list(range(5, 320)))
    multi_scale = hits(400, list(range(5, 314)) + list(range(320, 330)))
    chosen, evidence = choose_preset(
        {"none": none, "ten-crop": ten_crop, "multi-scale": multi_scale}
    )
    assert chosen == "ten-crop"
    assert [record["top1"] for record in evidence] == [0.75, 0.7875, 0.7975]
    assert evidence[1] | {"compared_with": "none", "gain_images": 15, "z": 3.0} == evidence[1]
    assert evidence[2] | {"compared_with": "ten-crop", "gain_images": 4, "z": 1.0} == evidence[2]
    # the same gains on a tenth of the images are within the noise: the cheapest stays
    small = {name: correct[::10] for name, correct in (("none", none), ("ten-crop", ten_crop))}
    assert choose_preset(small)[0] == "none"
    # ties and losses never buy views
    assert choose_preset({"none": none, "flip": none.clone()})[0] == "none"


def test_the_line_is_a_one_sided_five_percent_chance():
    """Fashion-600's evidence on the suite (66 validation images): ten-crop gets 7 right that
    none misses and misses 2 that none gets, z = 5 / sqrt(9) = 1.67: chosen (it scored 2.5
    points higher on the test split). One image fewer, z = 4 / sqrt(8) = 1.41: not."""
    none = hits(66, list(range(50)))
    ten_crop = hits(66, list(range(48)) + list(range(50, 57)))
    chosen, evidence = choose_preset({"none": none, "ten-crop": ten_crop})
    assert (chosen, evidence[1]["gain_images"], evidence[1]["z"]) == ("ten-crop", 5, 1.67)
    one_fewer = hits(66, list(range(48)) + list(range(50, 56)))
    assert choose_preset({"none": none, "ten-crop": one_fewer})[0] == "none"


def test_two_mistakes_or_fewer_cannot_be_outdone():
    """The bound `choose_tta` stops on: the best a costlier preset can do against a choice
    with m mistakes is to fix all m and break none, z = sqrt(m): 1.41 at 2, 1.73 at 3."""
    assert [can_be_outdone(mistakes) for mistakes in range(5)] == [False] * 3 + [True] * 2
    for mistakes in (2, 3):
        none = hits(100, list(range(100 - mistakes)))
        perfect = hits(100, list(range(100)))
        chosen, _ = choose_preset({"none": none, "ten-crop": perfect})
        assert (chosen == "ten-crop") == can_be_outdone(mistakes)


def fake_views(right_except: int):
    """A stand-in for `predict_probabilities` (per view) whose every view of every image is
    sure of its true class, except every view of the first `right_except` images, which are
    sure of the next class; it records the presets it was asked for."""
    asked = []

    def views(model, samples, tta, *args, **kwargs) -> predict.Probabilities:
        asked.append(tta)
        classes = len(model.class_names)
        labels = torch.tensor([label for _, label in samples])
        labels[:right_except] = (labels[:right_except] + 1) % classes
        mirrored, sides = model.trained_with_hflip, model.trained_short_sides
        tta_plan = plan(tta, model.preprocessing, None, "probabilities", mirrored, sides)
        count = tta_plan.views_per_image
        one_hot = torch.nn.functional.one_hot(labels, classes).float()
        cost = {"preset": tta, "views_per_image": count, "images_per_second": 1.0, "seconds": 1}
        return predict.Probabilities(
            one_hot[:, None].expand(-1, count, -1), list(range(len(samples))), [], cost
        )

    return views, asked


def test_the_choice_stops_once_no_costlier_preset_can_win(tiny_run: Path, monkeypatch):
    """With the cheapest preset wrong on 2 validation images no other can replace it: only the
    first pass (flip's, which has none's views) is computed, and the rest are listed as not
    measured; with 3 wrong, every pass runs."""
    model = predict.load_model(tiny_run)
    samples = [(f"image-{index}.png", index % len(model.class_names)) for index in range(20)]
    views, asked = fake_views(right_except=2)
    monkeypatch.setattr(predict, "predict_probabilities", views)
    choice = predict.choose_tta(model, samples, progress=False)
    assert asked == ["flip"] and choice["preset"] == "none"
    assert [record["preset"] for record in choice["candidates"]] == ["none", "flip"]
    assert choice["not_measured"] == ["ten-crop", "multi-scale"]
    assert "2 of 20 images wrong" in choice["stopped_early"]
    assert predict.unmeasured_presets(choice)[0].startswith("ten-crop and multi-scale not measured")
    views, asked = fake_views(right_except=3)
    monkeypatch.setattr(predict, "predict_probabilities", views)
    choice = predict.choose_tta(model, samples, progress=False)
    assert asked == ["flip", "multi-scale"] and choice["stopped_early"] is None
    assert len(choice["candidates"]) == 4 and choice["not_measured"] == []
    assert predict.unmeasured_presets(choice) == []


def test_candidates_are_the_presets_that_suit_the_model():
    assert [c.preset for c in candidate_plans(PREPROCESSING)] == list(AUTO_CANDIDATES)
    # no flips in training: no `flip`; one training scale: multi-scale would repeat ten-crop
    plain = (1 / PREPROCESSING.crop_pct,) * 2
    unflipped = candidate_plans(PREPROCESSING, mirrored=False, trained_short_sides=plain)
    assert [(c.preset, c.views_per_image) for c in unflipped] == [("none", 1), ("ten-crop", 5)]
    with pytest.raises(ValueError, match="resolve it first"):
        plan("auto", PREPROCESSING)


def test_training_records_the_choice_and_its_evidence(tiny_run: Path):
    choice = read_summary(tiny_run).tta_choice
    assert choice is not None and choice["preset"] in AUTO_CANDIDATES
    assert choice["images"] == read_summary(tiny_run).val_images
    assert predict.tta_choice_metric(choice) == "top-1 accuracy"
    assert [record["preset"] for record in choice["candidates"]] == list(AUTO_CANDIDATES)
    views = [record["views_per_image"] for record in choice["candidates"]]
    assert views == [1, 2, 10, 30]
    # each view computed once: none's from flip's pass, ten-crop's from multi-scale's
    measured_in = [record["measured_in"] for record in choice["candidates"]]
    assert measured_in == ["flip", "flip", "multi-scale", "multi-scale"]
    assert [(p["preset"], p["views_per_image"]) for p in choice["passes"]] == [
        ("flip", 2),
        ("multi-scale", 30),
    ]
    assert all(record["images_per_second"] > 0 for record in choice["passes"])
    assert "McNemar" in choice["rule"]


def test_the_step_chooses_on_the_validation_split_on_the_first_process_only(tiny_run: Path):
    config = read_config(tiny_run)
    images = build_datamodule(config)
    images.setup("fit")
    run = SimpleNamespace(images=images)
    best = SimpleNamespace(best_model_path=str(tiny_run / "best.ckpt"))
    first = SimpleNamespace(checkpoint_callback=best, is_global_zero=True)
    choice = choose_test_time_averaging(config, first, run)
    assert choice["images"] == len(images.val_set) and len(choice["candidates"]) == 4
    assert choice["preset"] == read_summary(tiny_run).tta_choice["preset"]  # deterministic
    other_rank = SimpleNamespace(checkpoint_callback=best, is_global_zero=False)
    assert choose_test_time_averaging(config, other_rank, run) is None
    off = FinetuneConfig.from_dict({**vars(config), "choose_tta": False})
    assert choose_test_time_averaging(off, first, run) is None


@pytest.fixture
def run_choosing_ten_crop(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run whose recorded choice is ten-crop."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    summary = json.loads((run / SUMMARY).read_text())
    summary["tta_choice"]["preset"] = "ten-crop"
    (run / SUMMARY).write_text(json.dumps(summary))
    return run


def evaluate_json(run: Path, data: Path, out: Path, *flags: str) -> dict:
    assert main(["evaluate", str(run), str(data), "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_evaluate_predict_and_report_use_the_recorded_choice(
    run_choosing_ten_crop: Path, colour_folder: Path, tmp_path: Path, capsys
):
    run, test = run_choosing_ten_crop, colour_folder / "test"
    results = evaluate_json(run, test, tmp_path / "auto.json", "--tta", "auto")
    assert (results["tta"]["preset"], results["tta"]["requested"]) == ("ten-crop", "auto")
    named = evaluate_json(run, test, tmp_path / "named.json", "--tta", "ten-crop")
    assert named["confusion_matrix"] == results["confusion_matrix"]
    capsys.readouterr()
    assert main(["predict", str(run), str(test), "--tta", "auto", "--top-k", "1"]) == 0
    auto_rows = capsys.readouterr().out
    assert main(["predict", str(run), str(test), "--tta", "ten-crop", "--top-k", "1"]) == 0
    assert capsys.readouterr().out == auto_rows
    assert main(["report", str(run), str(test), "--tta", "auto", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "ten-crop: 10 views per image" in page and "chosen for --tta auto" in page


def test_a_run_without_a_choice_evaluates_plainly_and_says_so(
    run_choosing_ten_crop: Path, colour_folder: Path, tmp_path: Path, caplog
):
    run = run_choosing_ten_crop
    summary = json.loads((run / SUMMARY).read_text())
    del summary["tta_choice"]  # a summary from before the field
    (run / SUMMARY).write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING):
        results = evaluate_json(run, colour_folder / "test", tmp_path / "r.json", "--tta", "auto")
    assert results["tta"]["preset"] == "none"
    assert "records no test-time averaging choice" in caplog.text
    assert json.loads((run / SUMMARY).read_text()) == summary  # nothing written


def test_export_cards_carry_the_choice_for_serving(
    run_choosing_ten_crop: Path, colour_folder: Path, tmp_path: Path
):
    from tlkit.infer.export import export_run

    card = export_run(run_choosing_ten_crop, tmp_path / "export", format="torchscript")
    chosen = card["test_time_augmentation"]
    assert chosen["preset"] == "ten-crop" and chosen["scale_sizes"] == [37]
    assert (chosen["views"], chosen["mirrored"], chosen["views_per_image"]) == ("crops", True, 10)
    assert chosen["chosen_on_validation"]["candidates"][0]["preset"] == "none"
    results = evaluate_json(
        tmp_path / "export", colour_folder / "test", tmp_path / "r.json", "--tta", "auto"
    )
    assert results["tta"]["preset"] == "ten-crop"

    summary = json.loads((run_choosing_ten_crop / SUMMARY).read_text())
    summary["tta_choice"] = None  # trained with --no-choose-tta
    (run_choosing_ten_crop / SUMMARY).write_text(json.dumps(summary))
    card = export_run(run_choosing_ten_crop, tmp_path / "plain", format="torchscript")
    assert card["test_time_augmentation"] is None
