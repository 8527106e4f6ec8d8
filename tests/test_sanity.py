"""Sanity checks: a healthy tiny set-up passes all four; each broken set-up fails its own check."""

import gzip
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from torch import nn

from tlkit.cli import main
from tlkit.commands.sanity import (
    balanced_subset,
    check_activations,
    check_gradient_flow,
    check_loss_at_init,
    check_overfit,
    report_lines,
    run_sanity_checks,
    stage_modules,
    subset_loader,
)
from tlkit.config import FinetuneConfig
from tlkit.data.images import write_image_folder
from tlkit.model.classifier import TransferClassifier
from tlkit.runfolder import DataFacts
from tlkit.train.build import build_datamodule, build_model

# Noisy one-colour images: real labels are fitted in a few steps by a linear head on frozen
# features, while shuffled labels would have to be memorised from the noise.
OVERFIT_BUDGET = 45  # real labels are fitted after 27 steps


@pytest.fixture(scope="module")
def config(colour_folder: Path) -> FinetuneConfig:
    return FinetuneConfig(
        data_dir=str(colour_folder),
        **{**TINY_CONFIG, "strategy": "features"},
        lr=1e-2,
        dropout=0.0,
        weight_decay=0.0,
    )


@pytest.fixture(scope="module")
def data(config: FinetuneConfig):
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    subset = balanced_subset(datamodule.train_set.samples, 20, seed=0)
    images, labels = next(iter(subset_loader(subset, datamodule.preprocessing, 8)))
    return datamodule, subset, images, labels


def overfit(model, data, samples=None, steps=OVERFIT_BUDGET):
    datamodule, subset, _, _ = data
    return check_overfit(model, samples or subset, datamodule.preprocessing, 8, steps=steps)


def test_balanced_subset_takes_up_to_n_per_class_seeded():
    samples = [(f"{label}-{i}", label) for label in range(3) for i in range(5 + 20 * label)]
    subset = balanced_subset(samples, 20, seed=0)
    counts = np.bincount([label for _, label in subset])
    assert list(counts) == [5, 20, 20]
    assert subset == balanced_subset(samples, 20, seed=0) != balanced_subset(samples, 20, seed=1)


def test_healthy_tiny_setup_passes_every_check(config, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="tlkit"):
        results = run_sanity_checks(config, overfit_steps=OVERFIT_BUDGET)
    assert [result.name for result in results] == [
        "loss at init",
        "overfit a tiny subset",
        "activation statistics",
        "gradient flow",
    ]
    assert all(result.passed for result in results), [str(r) for r in results]
    assert "PASS" not in capsys.readouterr().out  # the report is returned; the CLI prints it
    assert "Overfit epoch 1: step 3 / 45, loss " in caplog.text  # progress while it trains
    report = "\n".join(report_lines(results))
    assert "PASS loss at init: 1.09" in report  # ln 3 = 1.0986
    assert "hidden layer 3 (backbone.blocks.1) had mean " in report
    assert report.endswith("Sanity checks: 4 of 4 passed")


def test_learning_rate_zero_fails_the_overfit_check_only(config, data):
    model = build_model(config, DataFacts(data[0].classes))
    model.hparams.lr = 0.0  # FinetuneConfig refuses lr 0; the module uses what it is given
    _, _, images, labels = data
    assert check_loss_at_init(model, subset_loader(data[1], data[0].preprocessing, 8)).passed
    assert check_gradient_flow(model, images, labels).passed
    result = overfit(model, data, steps=9)
    assert not result.passed
    assert "after 9 steps (budget 9)" in result.summary


def test_shuffled_labels_fail_the_overfit_check(config, data):
    datamodule, subset, _, _ = data
    labels = np.random.default_rng(0).permutation([label for _, label in subset])
    shuffled = [(path, int(label)) for (path, _), label in zip(subset, labels, strict=True)]
    # The healthy set-up fits the real labels within the same budget (the test above).
    assert not overfit(build_model(config, DataFacts(datamodule.classes)), data, shuffled).passed


def test_large_head_weights_fail_the_loss_at_init_check_only(config, data):
    datamodule, subset, images, labels = data
    model = build_model(config, DataFacts(datamodule.classes))
    with torch.no_grad():  # randn: the lecture's "large" init, seeded (order-independent)
        model.head.classifier.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    result = check_loss_at_init(model, subset_loader(subset, datamodule.preprocessing, 8))
    assert not result.passed
    assert "expected (ln 3)" in result.summary and "head's initial scale" in result.summary
    assert check_activations(model, images).passed
    assert check_gradient_flow(model, images, labels).passed


def test_stages_are_the_backbone_layer_groups(config, data):
    model = build_model(config, DataFacts(data[0].classes))
    names = list(stage_modules(model.backbone))
    assert names == ["bn1", "blocks.0.0", *(f"blocks.{i}" for i in range(1, 6)), "bn2"]


def test_a_dead_stage_is_flagged_vanishing(config, data):
    model = build_model(config, DataFacts(data[0].classes))
    with torch.no_grad():
        for block in model.backbone.blocks[2]:  # zero the last norm of each block: no output
            block.bn3.weight.zero_()
            block.bn3.bias.zero_()
    result = check_activations(model, data[2])
    assert not result.passed
    assert "layer 4 (backbone.blocks.2) vanishing" in result.summary


def test_gradient_flow_catches_a_leaking_freeze_and_a_dead_parameter(data):
    datamodule, _, images, labels = data
    partial = FinetuneConfig(
        data_dir=str(datamodule.data_dir), pretrained="bundled", img_size=32, strategy="partial"
    )
    model = build_model(partial, DataFacts(datamodule.classes))
    assert check_gradient_flow(model, images, labels).passed
    model.backbone.conv_stem.weight.requires_grad = True  # frozen by the strategy
    model.head.unused = nn.Parameter(torch.zeros(3))  # trainable, never used
    result = check_gradient_flow(model, images, labels)
    assert not result.passed
    assert "backbone.conv_stem.weight: frozen by the strategy but received a gradient" in (
        result.summary
    )
    assert "head.unused: trainable but received no gradient" in result.summary


def test_sanity_command_exits_1_when_a_check_fails(colour_folder, capsys):
    flags = ["--pretrained", "bundled", "--img-size", "32", "--batch-size", "8"]
    flags += ["--num-workers", "0", "--val-fraction", "0.3", "--strategy", "features"]
    assert main(["sanity", str(colour_folder), *flags, "--overfit-steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "PASS loss at init" in out and "FAIL overfit a tiny subset" in out


@pytest.mark.parametrize("passed", [False, True])
def test_finetune_sanity_trains_only_if_the_checks_pass(
    passed, colour_folder, tmp_path, monkeypatch, capsys
):
    from conftest import TINY_RUN_FLAGS

    from tlkit.commands import sanity
    from tlkit.commands.sanity import CheckResult

    def checks(config, **options):
        return [CheckResult("overfit a tiny subset", passed, "stand-in")]

    monkeypatch.setattr(sanity, "run_sanity_checks", checks)
    out = tmp_path / "run"
    arguments = ["finetune", str(colour_folder), "--sanity", "--out", str(out)]
    assert main([*arguments, *TINY_RUN_FLAGS, "--epochs", "1"]) == (0 if passed else 1)
    assert (out / "best.ckpt").is_file() == passed
    if not passed:
        assert "a sanity check failed; not training" in capsys.readouterr().err


def test_tlkit_head_initialisation_is_the_documented_one():
    """He (randn / sqrt(fan_in / 2)) for the hidden ReLU layer, zeros for the logits (BiT)."""
    from tlkit.model.heads import ClassifierHead

    torch.manual_seed(0)
    head = ClassifierHead(1280, 10, dropout=0.0, hidden=512)
    hidden, classifier = head.layers[1], head.classifier
    assert hidden.weight.std().item() == pytest.approx((2 / 1280) ** 0.5, rel=0.02)
    assert not classifier.weight.any()
    assert not hidden.bias.any() and not classifier.bias.any()


def test_gradient_flow_leaves_the_zero_classifier_as_it_was(config, data):
    _, _, images, labels = data
    model = build_model(config, DataFacts(data[0].classes))
    assert check_gradient_flow(model, images, labels).passed
    assert not model.head.classifier.weight.any() and not model.head.classifier.bias.any()


FASHION_MNIST_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
REAL_IMAGES = 40


def read_idx_head(path: Path, count: int) -> np.ndarray:
    """The first `count` items of a gzipped IDX file (MNIST's format: magic, sizes, uint8 data)."""
    with gzip.open(path, "rb") as handle:
        dimensions = handle.read(4)[3]
        shape = [int.from_bytes(handle.read(4), "big") for _ in range(dimensions)]
        shape[0] = count
        return np.frombuffer(handle.read(math.prod(shape)), dtype=np.uint8).reshape(shape)


def fashion_mnist_head(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first images of Fashion-MNIST's test split (Debian's dataset-fashion-mnist)."""
    if not FASHION_MNIST_TEST_IMAGES.is_file():
        pytest.skip(
            f"Fashion-MNIST is not installed ({FASHION_MNIST_TEST_IMAGES} missing; "
            "apt-get install dataset-fashion-mnist); the digits variant still runs"
        )
    labels_file = FASHION_MNIST_TEST_IMAGES.with_name("t10k-labels-idx1-ubyte.gz")
    return read_idx_head(FASHION_MNIST_TEST_IMAGES, count), read_idx_head(labels_file, count)


def digits_head(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first of scikit-learn's real 8x8 handwritten digits, as 0..255 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images[:count] * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target[:count]


@pytest.mark.parametrize("read_images", [fashion_mnist_head, digits_head])
@pytest.mark.parametrize(
    "backbone, pretrained",
    # The real ImageNet weights (1,280 features of norm ~60 on Fashion-MNIST) and a second
    # family, ConvNeXt, whose LayerNorm-ed features have another scale again.
    [("tf_efficientnet_lite0", "bundled"), ("convnext_atto", "none")],
)
def test_loss_at_init_is_ln_c_on_real_images_for_every_backbone(
    read_images, backbone, pretrained, tmp_path
):
    images, labels = read_images(REAL_IMAGES)
    folder = write_image_folder(images, labels, [str(label) for label in range(10)], tmp_path)
    samples = sorted((str(path), int(path.parent.name)) for path in folder.glob("*/*.png"))
    torch.manual_seed(0)
    model = TransferClassifier(10, backbone, pretrained, img_size=64)
    loader = subset_loader(samples, model.preprocessing, batch_size=20)
    result = check_loss_at_init(model, loader)
    assert result.passed, result.summary
    # Not just within the tolerance: the logits start at zero, whatever the features' scale.
    assert result.summary.startswith(f"{math.log(10):.4f} measured on {REAL_IMAGES} images")
