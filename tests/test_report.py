"""`tlkit report`: one self-contained page for the tiny run; its numbers and its mistakes."""

import base64
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tlkit.cli import main
from tlkit.commands.report import Report, analyse, build_report
from tlkit.infer.predict import LabelledPredictions, evaluate, load_model, predict_labelled

PNG_DATA_URI = "data:image/png;base64,"
RESOURCE_ATTRIBUTES = {"src", "href", "srcset", "data", "action", "poster", "background"}


class PageParser(HTMLParser):
    """Every tag with its attributes, and the cell texts of the table of class `mistakes`."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.mistake_rows: list[list[str]] = []
        self._in_mistakes = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table" and attributes.get("class") == "mistakes":
            self._in_mistakes = True
        elif tag == "tr" and self._in_mistakes:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_mistakes = False
        elif tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:  # the header row has th cells only
                self.mistake_rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def tiny_report(tiny_run: Path, colour_folder: Path, tmp_path_factory) -> Report:
    """The report of the tiny run on its test split."""
    return build_report(tiny_run, colour_folder / "test", tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def mislabelled(colour_folder: Path, tmp_path_factory) -> Path:
    """The colour test images with the 'red' and 'blue' folders swapped: sure mistakes."""
    root = tmp_path_factory.mktemp("mislabelled")
    for source, target in (("red", "blue"), ("blue", "red"), ("green", "green")):
        shutil.copytree(colour_folder / "test" / source, root / target)
    return root


def test_report_page_embeds_every_image_and_references_nothing_outside(tiny_report: Report):
    page = tiny_report.page.read_text()
    tags = PageParser(page).tags
    sources = [attributes["src"] for tag, attributes in tags if tag == "img"]
    pngs = sorted(tiny_report.page.parent.glob("*.png"))
    assert pngs == sorted(tiny_report.figures)
    assert {path.name for path in pngs} >= {"learning_curves.png", "confusion_matrix.png"}
    assert len(sources) == len(pngs)
    written = {path.read_bytes() for path in pngs}
    for source in sources:
        assert source.startswith(PNG_DATA_URI)
        assert base64.b64decode(source[len(PNG_DATA_URI) :], validate=True) in written
    for tag, attributes in tags:
        assert tag not in {"script", "link", "iframe", "object", "embed", "base"}
        for name, value in attributes.items():
            if name in RESOURCE_ATTRIBUTES and tag != "img":
                pytest.fail(f"<{tag} {name}={value!r}> refers to a resource")
    assert "http://" not in page and "https://" not in page and "url(" not in page


def test_report_shows_the_run_card_and_per_class_table(tiny_report: Report):
    page = tiny_report.page.read_text()
    for text in (
        "tf_efficientnet_lite0",
        "bundled",
        "partial: last 1 stage(s)",
        "horizontal flip p=0.5",
        "colour jitter 0.4",
        "test-time augmentation",
        "test estimate",
        "on 12 held-out images, 95% interval",
        "skipped files",
        "Most confused pairs",
        "Worst mistakes",
    ):
        assert text in page, text
    for name in ("red", "green", "blue"):
        assert f"<td>{name}</td>" in page
    with Image.open(tiny_report.page.parent / "learning_curves.png") as curves:
        assert curves.size == (1300, 360)


def test_confusion_matrix_counts_every_evaluated_image(
    tiny_report: Report, tiny_run: Path, colour_folder: Path
):
    evaluation = tiny_report.evaluation
    assert evaluation.images == 12 and int(evaluation.confusion.sum()) == 12
    reference = evaluate(tiny_run, colour_folder / "test")
    assert evaluation.confusion.tolist() == reference["confusion_matrix"]
    assert evaluation.top1 == pytest.approx(reference["top1"])
    assert evaluation.top_k_accuracy == pytest.approx(reference["top5"])
    assert reference["per_class_accuracy"] == {row.name: row.recall for row in evaluation.per_class}
    assert sum(row.support for row in evaluation.per_class) == 12


def test_worst_mistakes_are_wrong_predictions_only_highest_loss_first(
    tiny_run: Path, mislabelled: Path, tmp_path: Path
):
    out = tmp_path / "report"
    flags = ["--out", str(out), "--mistakes", "5"]
    assert main(["report", str(tiny_run), str(mislabelled), *flags]) == 0
    page = (out / "report.html").read_text()
    predictions = predict_labelled(load_model(tiny_run), mislabelled)
    predicted = predictions.probabilities.argmax(dim=1)
    losses = -predictions.probabilities[range(12), predictions.labels].log()
    wrong = {
        path: float(loss)
        for path, loss, guess, label in zip(
            predictions.paths, losses, predicted, predictions.labels, strict=True
        )
        if guess != label
    }
    assert len(wrong) >= 5  # 8 images carry the other colour's label

    rows = PageParser(page).mistake_rows
    assert len(rows) == 5 and f"(of {len(wrong)} wrong)" in page
    for _, path, true_label, predicted_label, *_ in rows:
        assert Path(path).parts[0] == true_label != predicted_label  # relative to the data
        assert str(mislabelled / path) in wrong
    shown = {str(mislabelled / row[1]): wrong[str(mislabelled / row[1])] for row in rows}
    assert list(shown.values()) == sorted(shown.values(), reverse=True)
    not_shown = [loss for path, loss in wrong.items() if path not in shown]
    assert min(shown.values()) >= max(not_shown, default=0.0)
    with Image.open(out / "worst_mistakes.png") as grid:
        assert grid.size == (1040, 620)  # 4 columns x 2 rows of 260 x 310 px panels


def test_analyse_known_predictions():
    classes = ["a", "b", "c", "unseen"]
    probabilities = torch.tensor(
        [
            [0.90, 0.05, 0.05, 0.00],  # a, right
            [0.20, 0.70, 0.10, 0.00],  # a as b, loss -ln 0.2
            [0.10, 0.80, 0.10, 0.00],  # b, right
            [0.60, 0.30, 0.10, 0.00],  # b as a, loss -ln 0.3
            [0.05, 0.05, 0.90, 0.00],  # c, right
            [0.02, 0.90, 0.08, 0.00],  # c as b, loss -ln 0.08
        ]
    )
    predictions = LabelledPredictions(
        paths=[f"{index}.png" for index in range(6)],
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
        probabilities=probabilities,
        skipped=[("broken.jpg", "truncated")],
    )
    evaluation = analyse(predictions, classes, mistakes=2)
    assert evaluation.images == 6 and evaluation.wrong == 3 and evaluation.top1 == 0.5
    assert evaluation.top_k == 4 and evaluation.top_k_accuracy == 1.0
    assert evaluation.confusion.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert [m.path for m in evaluation.mistakes] == ["5.png", "1.png"]
    assert evaluation.mistakes[0].loss == pytest.approx(-math.log(0.08))
    assert evaluation.mistakes[0].predicted_probability == pytest.approx(0.9)
    by_name = {row.name: row for row in evaluation.per_class}
    assert by_name["b"].precision == pytest.approx(1 / 3) and by_name["b"].recall == 0.5
    assert by_name["c"].f1 == pytest.approx(2 / 3) and by_name["c"].predicted == 1
    assert [row.name for row in evaluation.per_class] == ["b", "a", "c", "unseen"]
    assert evaluation.macro_f1 == pytest.approx((0.4 + 0.5 + 2 / 3) / 3)
    pairs = [(p.true_label, p.predicted_label, p.count) for p in evaluation.confused_pairs]
    assert pairs == [("a", "b", 1), ("b", "a", 1), ("c", "b", 1)]
    assert evaluation.skipped == [("broken.jpg", "truncated")]


def test_report_defaults_to_the_runs_test_split_and_works_without_one(
    tiny_run: Path, colour_folder: Path, tmp_path: Path
):
    report = build_report(tiny_run, out=tmp_path / "default")
    assert report.evaluation.images == 12

    # A run logged to TensorBoard (no metrics.csv) whose data has no test/ split.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "metrics.csv").unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(
        yaml.safe_dump({**config, "data_dir": str(colour_folder / "train")})
    )
    report = build_report(run)
    assert report.evaluation is None and report.page == run / "report" / "report.html"
    assert [path.name for path in report.figures] == ["learning_curves.png"]
    assert "No labelled evaluation data" in report.page.read_text()


def test_report_user_errors_exit_2(tiny_run: Path, tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "best.ckpt is missing" in capsys.readouterr().err
    assert main(["report", str(tiny_run), "--mistakes", "-1", "--out", str(tmp_path)]) == 2
    assert "--mistakes must be 0 or more" in capsys.readouterr().err
