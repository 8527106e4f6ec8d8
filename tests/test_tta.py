import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_FLAGS
from torch import nn

from tlkit.cli import main
from tlkit.data.augment import eval_transform
from tlkit.data.images import load_rgb
from tlkit.data.sources import scan
from tlkit.infer.predict import load_model, predict_probabilities
from tlkit.infer.tta import (
    TTA_MEMORY_BUDGET,
    ScaleSquares,
    TTAModule,
    TTAPlan,
    average_scales,
    covers,
    loader_batch_size,
    make_views,
    measuring_plans,
    plan,
    views_of,
)
from tlkit.model.classifier import TransferClassifier
from tlkit.model.tasks import TASKS
from tlkit.runfolder import DataFacts, Preprocessing

PREPROCESSING = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
ALL_RESNET_SCALES = (224 / 224, 640 / 224)  # a model trained at every ResNet test scale


def coordinate_squares(batch: int, side: int) -> torch.Tensor:
    """Channel 0 holds each pixel's row, channel 1 its column, channel 2 the image index."""
    rows = torch.arange(side).view(side, 1).expand(side, side)
    columns = torch.arange(side).view(1, side).expand(side, side)
    return torch.stack(
        [torch.stack([rows, columns, torch.full_like(rows, index)]) for index in range(batch)]
    ).float()


def test_ten_crops_are_corners_centre_and_their_mirrors():
    crops = make_views(coordinate_squares(3, 10), TTAPlan("ten-crop", 4, (10,), "crops", True))
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
    # the default training scales, 256-480 at 224 (37-69 px at 32): three ResNet scales
    assert counts == {"none": 1, "flip": 2, "ten-crop": 10, "multi-scale": 30, "dense": 3}
    assert plan("ten-crop", PREPROCESSING).scale_sizes == (37,)  # 32 / 0.875
    assert plan("multi-scale", PREPROCESSING).scale_sizes == (37, 55, 69)
    assert plan("dense", PREPROCESSING, scales=(1.0, 1.5)).scale_sizes == (37, 48)
    wide = plan("multi-scale", PREPROCESSING, trained_short_sides=ALL_RESNET_SCALES)
    assert wide.scale_sizes == (32, 37, 55, 69, 91) and wide.views_per_image == 42
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
        for index in range(len(photos)):  # each scale weighs the same
            per_scale = [
                torch.stack(
                    [
                        tiny_model(view.unsqueeze(0)).softmax(-1)[0]
                        for view in make_views(squares[index : index + 1], tta)[0]
                    ]
                ).mean(0)
                for squares in scales
            ]
            naive.append(torch.stack(per_scale).mean(0))
    assert torch.allclose(batched, torch.stack(naive), atol=1e-5)


@pytest.mark.parametrize(
    ("wide", "narrow", "mirrored"),
    [
        ("flip", "none", True),
        ("multi-scale", "ten-crop", True),
        ("multi-scale", "ten-crop", False),
        ("multi-scale", "none", True),  # not covered: other squares
    ],
)
def test_a_narrower_preset_is_taken_from_a_wider_ones_views(
    tiny_model, photos, wide: str, narrow: str, mirrored: bool
):
    """`--tta auto` computes each view once: the covered preset's average from the wider
    preset's per-view probabilities equals running the covered preset itself."""
    wide_plan = plan(wide, PREPROCESSING, mirrored=mirrored)
    narrow_plan = plan(narrow, PREPROCESSING, mirrored=mirrored)
    if not covers(wide_plan, narrow_plan):
        assert wide == "multi-scale" and narrow == "none"
        with pytest.raises(ValueError, match="do not include"):
            views_of(wide_plan, narrow_plan, torch.zeros(1, wide_plan.views_per_image, 3))
        return
    assert measuring_plans([narrow_plan, wide_plan]) == [wide_plan]
    with torch.no_grad():
        per_view = TTAModule(tiny_model, wide_plan, per_view=True)(scale_batches(photos, wide_plan))
        direct = TTAModule(tiny_model, narrow_plan)(scale_batches(photos, narrow_plan))
    assert per_view.shape[1] == wide_plan.views_per_image
    taken = views_of(wide_plan, narrow_plan, per_view)
    assert sum(views.shape[1] for views in taken) == narrow_plan.views_per_image
    derived = average_scales(taken, narrow_plan.average, tiny_model.task)
    assert torch.allclose(derived, direct, atol=1e-6)


def test_none_equals_plain_evaluation(tiny_model, colour_folder: Path):
    samples = scan(colour_folder / "test", tiny_model.class_names).samples
    predicted = predict_probabilities(tiny_model, samples, "none", batch_size=5)
    probabilities, cost = predicted.values, predicted.cost
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

    task = TASKS["single-label"]

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


class Confident(nn.Module):
    """The tiny model's logits x100: a briefly trained head is nearly uniform, and so would
    be every average of its views."""

    task = TASKS["single-label"]

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 100 * self.inner(images)

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).softmax(-1)


def test_geometric_average_is_the_softmax_of_mean_logits(tiny_model, photos):
    model = Confident(tiny_model)
    results = {}
    for average in ("probabilities", "geometric"):
        tta = plan("ten-crop", PREPROCESSING, average=average)
        with torch.no_grad():
            results[average] = TTAModule(model, tta)(scale_batches(photos, tta))
        assert torch.allclose(results[average].sum(-1), torch.ones(len(photos)), atol=1e-5)
    views = make_views(scale_batches(photos, tta)[0], tta)
    with torch.no_grad():
        logits = model(views.flatten(0, 1)).unflatten(0, views.shape[:2])
    assert torch.allclose(results["geometric"], logits.mean(1).softmax(-1), atol=1e-5)
    assert not torch.allclose(results["probabilities"], results["geometric"])


def test_multi_label_views_average_per_class_and_geometric_is_the_mean_log_odds(photos):
    """Sigmoid outputs are averaged class by class (no renormalisation across classes); the
    geometric average is the sigmoid of the mean logits, as softmax's is for single-label."""
    torch.manual_seed(0)
    model = TransferClassifier(3, "test_resnet", "none", img_size=32, task="multi-label").eval()
    with torch.no_grad():
        model.head.classifier.weight.normal_()  # a zero head would give 0.5 everywhere
    results = {}
    for average in ("probabilities", "geometric"):
        tta = plan("ten-crop", PREPROCESSING, average=average)
        with torch.no_grad():
            results[average] = TTAModule(model, tta)(scale_batches(photos, tta))
    views = make_views(scale_batches(photos, tta)[0], tta)
    with torch.no_grad():
        logits = model(views.flatten(0, 1)).unflatten(0, views.shape[:2])
    assert torch.allclose(results["probabilities"], logits.sigmoid().mean(1), atol=1e-6)
    assert torch.allclose(results["geometric"], logits.mean(1).sigmoid(), atol=1e-5)
    assert not torch.allclose(results["probabilities"].sum(-1), torch.ones(len(photos)))


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
    from tlkit.commands.report import build_report

    build_report(tiny_run, colour_folder / "test", tmp_path / "report", tta="flip")
    assert "flip: 2 views per image" in (tmp_path / "report" / "report.html").read_text()


def old_ten_crop_average(model, squares_per_scale, size: int) -> torch.Tensor:
    """The computation before duplicates were dropped: ten crops at every scale, one mean."""
    probabilities = []
    for squares in squares_per_scale:
        far = squares.shape[-1] - size
        offsets = ((0, 0), (0, far), (far, 0), (far, far), (far // 2, far // 2))
        crops = [squares[..., y : y + size, x : x + size] for y, x in offsets]
        for view in crops + [crop.flip(-1) for crop in crops]:
            probabilities.append(model(view).softmax(-1))
    return torch.stack(probabilities, dim=1).mean(dim=1)


def test_multi_scale_drops_the_duplicate_crops_at_the_input_size(tiny_model, photos):
    tta = plan("multi-scale", PREPROCESSING, trained_short_sides=ALL_RESNET_SCALES)
    assert tta.scale_sizes[0] == PREPROCESSING.input_size  # the square is the crop there
    assert tta.views_per_image == 2 + 4 * 10  # one crop and its mirror, then ten per scale
    unmirrored = plan(
        "multi-scale", PREPROCESSING, mirrored=False, trained_short_sides=ALL_RESNET_SCALES
    )
    assert unmirrored.views_per_image == 1 + 4 * 5
    assert plan("ten-crop", replace(PREPROCESSING, crop_pct=1.0)).views_per_image == 2
    scales = scale_batches(photos, tta)
    assert make_views(scales[0], tta).shape[1] == 2
    with torch.no_grad():
        deduplicated = TTAModule(tiny_model, tta, max_views_per_forward=16)(scales)
        old = old_ten_crop_average(tiny_model, scales, PREPROCESSING.input_size)
    # each scale keeps the weight it had with its ten views: the result is the old average
    assert torch.allclose(deduplicated, old, atol=1e-6)


def test_large_plans_load_smaller_batches_with_the_same_result(tiny_model, colour_folder: Path):
    at_224 = replace(PREPROCESSING, input_size=224)
    multi_scale = plan("multi-scale", at_224)
    assert loader_batch_size(multi_scale, 64) < 64 <= loader_batch_size(plan("none", at_224), 64)
    assert loader_batch_size(multi_scale, 64) * multi_scale.bytes_per_image <= TTA_MEMORY_BUDGET
    assert loader_batch_size(multi_scale, 1) == 1

    samples = scan(colour_folder / "test", tiny_model.class_names).samples
    full = predict_probabilities(tiny_model, samples, "multi-scale", batch_size=12)
    full, full_cost = full.values, full.cost
    tiny_budget = 2 * plan("multi-scale", tiny_model.preprocessing).bytes_per_image
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tlkit.infer.tta.TTA_MEMORY_BUDGET", tiny_budget)
        bounded = predict_probabilities(tiny_model, samples, "multi-scale", batch_size=12)
        bounded, bounded_cost = bounded.values, bounded.cost
    assert (full_cost["loader_batch_size"], bounded_cost["loader_batch_size"]) == (12, 2)
    assert torch.allclose(full, bounded, atol=1e-6)


def test_runs_record_whether_training_flipped_images():
    from tlkit.config import FinetuneConfig
    from tlkit.train.build import trains_with_hflip

    assert trains_with_hflip(FinetuneConfig(strategy="partial"))  # default --hflip 0.5
    assert not trains_with_hflip(FinetuneConfig(strategy="partial", hflip=0))
    assert not trains_with_hflip(FinetuneConfig(strategy="partial", augment=False))
    # the features head trains on plain cached views unless augmented views are cached
    assert not trains_with_hflip(FinetuneConfig(strategy="features"))
    assert trains_with_hflip(FinetuneConfig(strategy="features", cache_augmented_views=2))


@pytest.fixture(scope="module")
def unflipped_run(colour_folder: Path, tmp_path_factory) -> Path:
    """A finished run trained with `--hflip 0`, as for digits or text."""
    out = tmp_path_factory.mktemp("runs") / "no-flip"
    flags = [*TINY_RUN_FLAGS, "--epochs", "1", "--hflip", "0"]
    assert main(["finetune", str(colour_folder), "--out", str(out), *flags]) == 0
    return out


def test_runs_trained_without_flips_get_no_mirrored_views(unflipped_run: Path, colour_folder):
    model = load_model(unflipped_run)
    assert model.trained_with_hflip is False
    samples = scan(colour_folder / "test", model.class_names).samples
    predicted = predict_probabilities(model, samples, "ten-crop", batch_size=8)
    probabilities, cost = predicted.values, predicted.cost
    assert cost["views_per_image"] == 5 and cost["mirrored"] is False
    tta = plan("ten-crop", model.preprocessing)
    squares = torch.stack(
        [
            ScaleSquares(tta, model.preprocessing)(image=load_rgb(path))["image"][0]
            for path, _ in samples
        ]
    )
    size = model.preprocessing.input_size
    far = squares.shape[-1] - size
    offsets = ((0, 0), (0, far), (far, 0), (far, far), (far // 2, far // 2))
    with torch.no_grad():
        five = torch.stack(
            [model(squares[..., y : y + size, x : x + size]).softmax(-1) for y, x in offsets]
        )
    assert torch.allclose(probabilities, five.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="trained without horizontal flips"):
        predict_probabilities(model, samples, "flip")


def test_flipped_runs_keep_their_mirrored_views(tiny_model, colour_folder: Path):
    assert tiny_model.trained_with_hflip is True  # the default --hflip 0.5
    samples = scan(colour_folder / "test", tiny_model.class_names).samples
    cost = predict_probabilities(tiny_model, samples, "ten-crop", batch_size=8).cost
    assert cost["views_per_image"] == 10 and cost["mirrored"] is True


def test_export_cards_carry_the_training_flips(unflipped_run: Path, colour_folder, tmp_path):
    from tlkit.infer.export import ExportedModel, export_run

    card = export_run(unflipped_run, tmp_path / "export", format="torchscript")
    assert card["model"]["trained_with_hflip"] is False
    code = main(
        [
            "evaluate",
            str(tmp_path / "export"),
            str(colour_folder / "test"),
            "--tta",
            "multi-scale",
            "--out",
            str(tmp_path / "results.json"),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tta"]["views_per_image"] == 3 * 5 and not results["tta"]["mirrored"]
    # cards and checkpoints written before the field existed: flips, as those runs had
    del card["model"]["trained_with_hflip"]
    assert ExportedModel(card, lambda images: images).trained_with_hflip is True


def test_checkpoints_without_the_field_assume_flips(unflipped_run: Path, tmp_path: Path):
    checkpoint = torch.load(unflipped_run / "best.ckpt", weights_only=True)
    del checkpoint["hyper_parameters"]["trained_with_hflip"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert TransferClassifier.load_checkpoint(tmp_path / "old.ckpt").trained_with_hflip is True


def test_multi_scale_and_dense_keep_to_the_scales_of_training():
    """Only the ResNet scales within the trained range, and always the evaluation scale."""
    narrow = plan("multi-scale", PREPROCESSING, trained_short_sides=(300 / 224, 400 / 224))
    assert narrow.scale_sizes == (37, 55)  # 37: the evaluation scale, below the range
    # trained without scale augmentation: the evaluation resize alone, as ten-crop
    plain = (1 / PREPROCESSING.crop_pct,) * 2
    assert plan("multi-scale", PREPROCESSING, trained_short_sides=plain) == replace(
        plan("ten-crop", PREPROCESSING), preset="multi-scale"
    )
    assert plan("dense", PREPROCESSING, trained_short_sides=plain).scale_sizes == (37,)
    # given scales are candidates too: the untrained ones are left out
    given = plan("dense", PREPROCESSING, scales=(1.0, 2.0, 3.0), trained_short_sides=plain)
    assert given.scale_sizes == (37,)


def test_runs_record_the_scales_they_trained_at():
    from tlkit.config import FinetuneConfig
    from tlkit.train.build import build_model, trained_short_sides

    assert trained_short_sides(FinetuneConfig(strategy="partial")) == (256 / 224, 480 / 224)
    custom = FinetuneConfig(strategy="partial", short_side_min=300, short_side_max=400)
    assert trained_short_sides(custom) == (300 / 224, 400 / 224)
    evaluation = (1 / 0.875, 1 / 0.875)  # tf_efficientnet_lite0's crop_pct
    assert trained_short_sides(FinetuneConfig(strategy="partial", augment=False)) == evaluation
    # a features head on plain cached views saw the evaluation resize; without the cache it
    # trains on the augmented images themselves
    assert trained_short_sides(FinetuneConfig(strategy="features")) == evaluation
    uncached = FinetuneConfig(strategy="features", cache=False)
    assert trained_short_sides(uncached) == (256 / 224, 480 / 224)
    plain = FinetuneConfig(strategy="partial", augment=False, img_size=32, pretrained="none")
    model = build_model(plain, DataFacts(["a", "b"]))
    assert model.trained_short_sides == pytest.approx(evaluation)
    assert plan("multi-scale", model.preprocessing, **_trained(model)).scale_sizes == (37,)


def _trained(model) -> dict:
    return {"mirrored": model.trained_with_hflip, "trained_short_sides": model.trained_short_sides}


def test_checkpoints_without_the_scales_assume_the_default_range(tiny_run: Path, tmp_path: Path):
    checkpoint = torch.load(tiny_run / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["trained_short_sides"] == [256 / 224, 480 / 224]
    del checkpoint["hyper_parameters"]["trained_short_sides"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = TransferClassifier.load_checkpoint(tmp_path / "old.ckpt")
    assert old.trained_short_sides == (256 / 224, 480 / 224)  # tlkit's range before it recorded


def test_export_cards_carry_the_training_scales(unflipped_run: Path, tmp_path: Path):
    from tlkit.infer.export import ExportedModel, export_run

    card = export_run(unflipped_run, tmp_path / "export", format="safetensors")
    assert card["model"]["trained_short_sides"] == [256 / 224, 480 / 224]
    card["model"]["trained_short_sides"] = [1.0, 1.5]
    assert ExportedModel(card, lambda images: images).trained_short_sides == (1.0, 1.5)
    del card["model"]["trained_short_sides"]  # a card from before the field
    assert ExportedModel(card, lambda images: images).trained_short_sides == (256 / 224, 480 / 224)
