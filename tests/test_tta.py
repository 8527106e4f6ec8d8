import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tlkit.augment import eval_transform
from tlkit.backbones import Preprocessing
from tlkit.cli import main
from tlkit.data import load_rgb, scan
from tlkit.inference import load_model, predict_probabilities
from tlkit.module import TransferClassifier
from tlkit.tta import ScaleSquares, TTAModule, make_views, plan, ten_crops

PREPROCESSING = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def coordinate_squares(batch: int, side: int) -> torch.Tensor:
    """Channel 0 holds each pixel's row, channel 1 its column, channel 2 the image index."""
    rows = torch.arange(side).view(side, 1).expand(side, side)
    columns = torch.arange(side).view(1, side).expand(side, side)
    return torch.stack(
        [torch.stack([rows, columns, torch.full_like(rows, index)]) for index in range(batch)]
    ).float()


def test_ten_crops_are_corners_centre_and_their_mirrors():
    crops = ten_crops(coordinate_squares(3, 10), size=4)
    assert crops.shape == (3, 10, 3, 4, 4)
    expected_top_left = [(0, 0), (0, 6), (6, 0), (6, 6), (3, 3)]
    for view, (top, left) in enumerate(expected_top_left):
        assert crops[:, view, 0, 0, 0].eq(top).all() and crops[:, view, 1, 0, 0].eq(left).all()
        assert crops[:, view, 1, 0].tolist() == [list(range(left, left + 4))] * 3
        mirrored = crops[:, view + 5]
        assert torch.equal(mirrored, crops[:, view].flip(-1))
        assert mirrored[:, 1, 0].tolist() == [list(range(left + 3, left - 1, -1))] * 3
    assert crops[:, :, 2].amax(dim=(1, 2, 3)).tolist() == [0, 1, 2]  # never mixes images


def test_presets_resolve_views_and_scales():
    counts = {
        name: plan(name, PREPROCESSING).views_per_image
        for name in ("none", "flip", "ten-crop", "multi-scale", "dense")
    }
    assert counts == {"none": 1, "flip": 2, "ten-crop": 10, "multi-scale": 50, "dense": 5}
    assert plan("ten-crop", PREPROCESSING).scale_sizes == (37,)  # 32 / 0.875
    assert plan("multi-scale", PREPROCESSING).scale_sizes == (32, 37, 55, 69, 91)
    assert plan("dense", PREPROCESSING, scales=(1.0, 1.5)).scale_sizes == (32, 48)
    with pytest.raises(ValueError, match="unknown TTA preset"):
        plan("fifty-crop", PREPROCESSING)


@pytest.fixture(scope="module")
def tiny_model(tiny_run: Path) -> TransferClassifier:
    return load_model(tiny_run)


@pytest.fixture(scope="module")
def photos(colour_folder: Path) -> list[np.ndarray]:
    paths = sorted((colour_folder / "test").rglob("*.*"))[:5]
    return [load_rgb(path) for path in paths]


def scale_batches(photos, tta) -> list[torch.Tensor]:
    transform = ScaleSquares(tta, PREPROCESSING)
    per_image = [transform(image=photo)["image"] for photo in photos]
    return [torch.stack(scale) for scale in zip(*per_image, strict=True)]


@pytest.mark.parametrize("preset", ["flip", "ten-crop", "multi-scale", "dense"])
def test_batched_views_equal_a_naive_loop_over_views(tiny_model, photos, preset: str):
    tta = plan(preset, PREPROCESSING)
    scales = scale_batches(photos, tta)
    with torch.no_grad():
        batched = TTAModule(tiny_model, tta, max_views_per_forward=7)(scales)
        naive = []
        for index in range(len(photos)):
            probabilities = [
                tiny_model(view.unsqueeze(0)).softmax(-1)[0]
                for squares in scales
                for view in make_views(squares[index : index + 1], tta)[0]
            ]
            naive.append(torch.stack(probabilities).mean(0))
    assert torch.allclose(batched, torch.stack(naive), atol=1e-5)


def test_none_equals_plain_evaluation(tiny_model, colour_folder: Path):
    samples = scan(colour_folder / "test", tiny_model.class_names).samples
    probabilities, cost = predict_probabilities(tiny_model, samples, "none", batch_size=5)
    transform = eval_transform(tiny_model.preprocessing)
    images = torch.stack([transform(image=load_rgb(path))["image"] for path, _ in samples])
    with torch.no_grad():
        plain = tiny_model(images).softmax(-1)
    assert torch.allclose(probabilities, plain, atol=1e-6)
    assert cost["views_per_image"] == 1 and cost["images_per_second"] > 0


class MirrorSymmetric(nn.Module):
    """Flip-invariant by construction: f(x) = g(x) + g(mirror(x))."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images) + self.inner(images.flip(-1))

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).softmax(-1)


def test_flip_invariant_model_gives_identical_none_and_flip(tiny_model, photos):
    model = MirrorSymmetric(tiny_model)
    with torch.no_grad():
        none = TTAModule(model, plan("none", PREPROCESSING))(
            scale_batches(photos, plan("none", PREPROCESSING))
        )
        flip = TTAModule(model, plan("flip", PREPROCESSING))(
            scale_batches(photos, plan("flip", PREPROCESSING))
        )
    assert torch.allclose(none, flip, atol=1e-6)


def test_geometric_average_is_the_softmax_of_mean_logits(tiny_model, photos):
    results = {}
    for average in ("probabilities", "geometric"):
        tta = plan("ten-crop", PREPROCESSING, average=average)
        with torch.no_grad():
            results[average] = TTAModule(tiny_model, tta)(scale_batches(photos, tta))
        assert torch.allclose(results[average].sum(-1), torch.ones(len(photos)), atol=1e-5)
    views = make_views(scale_batches(photos, tta)[0], tta)
    with torch.no_grad():
        logits = tiny_model(views.flatten(0, 1)).unflatten(0, views.shape[:2])
    assert torch.allclose(results["geometric"], logits.mean(1).softmax(-1), atol=1e-5)
    assert not torch.allclose(results["probabilities"], results["geometric"])


def test_dense_refuses_fixed_size_backbones():
    vit = TransferClassifier(num_classes=3, backbone="vit_tiny_patch16_224", pretrained="none")
    with pytest.raises(ValueError, match="fixed input size"):
        TTAModule(vit, plan("dense", PREPROCESSING))
    TTAModule(vit, plan("multi-scale", PREPROCESSING))  # fixed-size crops are fine


def test_cli_reports_the_preset_and_its_cost(tiny_run: Path, colour_folder: Path, capsys):
    assert main(["evaluate", str(tiny_run), str(colour_folder / "test"), "--tta", "flip"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["tta"]["preset"] == "flip" and results["tta"]["views_per_image"] == 2
    assert results["tta"]["views_per_second"] == pytest.approx(
        2 * results["tta"]["images_per_second"], rel=0.01
    )
    assert main(["evaluate", str(tiny_run), str(colour_folder / "test"), "--tta", "dense"]) == 0


def test_report_names_the_tta_preset(tiny_run: Path, colour_folder: Path, tmp_path: Path):
    from tlkit.report import build_report

    build_report(tiny_run, colour_folder / "test", tmp_path / "report", tta="flip")
    assert "flip: 2 views per image" in (tmp_path / "report" / "report.html").read_text()
