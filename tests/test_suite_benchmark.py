"""benchmarks/suite.py and its datasets: held-out test images, balanced accuracy, the goal."""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import suite  # noqa: E402
import suite_datasets  # noqa: E402


def images(folder: Path) -> dict[str, Counter]:
    """Class -> count of image files, per split folder."""
    return {
        split.name: Counter(path.parent.name for path in split.rglob("*.png"))
        for split in folder.iterdir()
        if split.is_dir()
    }


def test_digits_are_built_once_with_a_fixed_test_split(tmp_path: Path):
    folder, record = suite_datasets.build("digits", tmp_path)
    counts = images(folder)
    assert set(counts) == {"train", "test"}
    assert sum(counts["train"].values()) + sum(counts["test"].values()) == 1797
    assert record["classes"] == 10 and record["images"] == {"train": 1347, "test": 450}
    assert record["short_side"] == [8, 8, 8]
    stamp = (folder / suite_datasets.RECORD).stat().st_mtime_ns
    assert suite_datasets.build("digits", tmp_path)[1] == record  # reused, not written again
    assert (folder / suite_datasets.RECORD).stat().st_mtime_ns == stamp


def test_a_missing_source_names_the_package_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(
        suite_datasets.DATASETS,
        "stamps",
        suite_datasets.Dataset("", {"tuxpaint-stamps-default": tmp_path / "no-stamps"}, None),
    )
    with pytest.raises(suite_datasets.SourceMissing, match="apt-get install -y tuxpaint-stamps"):
        suite_datasets.build("stamps", tmp_path)
    assert not (tmp_path / "stamps").exists()


def test_scene_sequences_are_split_in_time_with_gaps():
    for frames in (30, 33, 80, 501):
        split = suite_datasets.sequence_split(frames)
        train, val, test = split["train"], split["val"], split["test"]
        for name, indices in split.items():
            assert 0 < len(indices) <= suite_datasets.SCENE_SEGMENTS[name][2]
        assert train.max() < val.min() - 1 and val.max() < test.min() - 1  # a frame between
        assert train.min() == 0 and test.max() == frames - 1


def test_card_designs_are_held_out_whole():
    families = ["anglo"] * 6 + ["oxygen"] * 3 + [f"deck{i}" for i in range(20)]
    held = suite_datasets.held_out_families(families, 0.25, seed=0)
    held_decks = sum(family in held for family in families)
    assert held_decks >= 0.25 * len(families)
    assert held_decks < 0.25 * len(families) + 6  # stops once the share is reached
    assert held == suite_datasets.held_out_families(families, 0.25, seed=0)
    assert held != suite_datasets.held_out_families(families, 0.25, seed=1)


@pytest.mark.slow  # writes and scans the 605 stamps
@pytest.mark.skipif(
    suite_datasets.missing_packages("stamps"), reason="needs tuxpaint-stamps-default"
)
def test_stamps_are_imbalanced_and_no_test_stamp_is_a_training_stamp(tmp_path: Path):
    folder, record = suite_datasets.build("stamps", tmp_path)
    smallest, _, largest = record["train_per_class"]
    assert largest >= 10 * smallest
    train = {path.name for path in (folder / "train").rglob("*.png")}
    test = {path.name for path in (folder / "test").rglob("*.png")}
    assert train and test and not train & test
    assert not any("_mirror" in name for name in train | test)


def test_balanced_accuracy_averages_the_recalls_of_classes_with_test_images():
    assert suite.balanced_accuracy({"a": 1.0, "b": 0.5, "c": None}) == pytest.approx(0.75)


def result(top1: float, wall: float) -> dict:
    return {"test_top1": top1, "wall_s": wall}


def test_goal_checks_state_each_part_with_its_numbers():
    results = {
        "auto": result(0.880, 120),
        "features": result(0.850, 30),
        "partial": result(0.884, 100),
        "full-no-augment": result(0.890, 200),
        "search": result(0.895, 2000),
    }
    checks = suite.goal_checks(results)
    assert checks == [
        "vs search best -1.5 pt (missed)",
        "vs best manual (full-no-augment) -1.0 pt (missed)",
        "wall 1.20x default manual (met)",
    ]
    results["auto"] = result(0.8905, 121)
    assert [check.split("(")[-1] for check in suite.goal_checks(results)] == [
        "met)",
        "met)",
        "missed)",
    ]
    assert suite.goal_checks({"features": result(0.5, 1)}) == []


def test_img_size_auto_takes_the_auto_rows_choice(tmp_path: Path):
    arguments = argparse.Namespace(img_size="auto")
    with pytest.raises(SystemExit, match="run it first"):
        suite.size_flags(arguments, tmp_path)
    (tmp_path / "auto.json").write_text(json.dumps({"settings": {"img_size": 96}}))
    assert suite.size_flags(arguments, tmp_path) == ["--img-size", "96"]
    assert suite.size_flags(argparse.Namespace(img_size=None), tmp_path) == []
