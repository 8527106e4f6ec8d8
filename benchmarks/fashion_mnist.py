"""The Fashion-MNIST transfer study: every strategy, with and without augmentation, with TTA.

    apt-get install dataset-fashion-mnist
    python benchmarks/fashion_mnist.py --train-images 10000 --test-images 4000 --epochs 5

Real data from Debian's `dataset-fashion-mnist`, bundled EfficientNet-Lite0 (ImageNet weights),
upscaled to --img-size. Rows (`--rows STRATEGY/AUGMENTATION ...`, default: the ten of the first
two augmentations): random init (`--pretrained none`), features (cached; with augmentation: 4
cached augmented views), partial (last 1 and last 2 stages), full; augmentation `default`
(tlkit's: scale crops, flip, colour jitter), `none`, or `light` (flip and mild scale crops, no
jitter: the gentler pipeline docs/augmentation.md recommends for small, centred images). Each
run's best checkpoint is evaluated with TTA `none`, `flip` and `ten-crop` (runs trained without
flips: no `flip`, and ten-crop's five crops without mirror images).

Every row is an ordinary `tlkit.train.finetune` run in WORK/<row>; a finished row is reused when the
study runs again (with the same config, else it stops), and the table (WORK/results.md, with the
published anchors) and the learning-curve PNG (validation top-1 per epoch, by default
docs/images/fashion-mnist-curves.png) cover every finished row in WORK.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import write_fashion_mnist  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402
from tlkit.infer.predict import evaluate  # noqa: E402
from tlkit.train.build import trains_with_hflip  # noqa: E402

STRATEGIES = {
    "random init": {"pretrained": "none", "strategy": "full", "backbone_lr_scale": 1.0},
    "features": {"pretrained": "bundled", "strategy": "features"},
    "partial-1": {"pretrained": "bundled", "strategy": "partial", "unfreeze_stages": 1},
    "partial-2": {"pretrained": "bundled", "strategy": "partial", "unfreeze_stages": 2},
    "full": {"pretrained": "bundled", "strategy": "full"},
}
AUGMENTATIONS = {
    "default": {"augment": True},
    "none": {"augment": False},
    "light": {"augment": True, "color_jitter": 0.0, "short_side_min": 224, "short_side_max": 288},
}
DEFAULT_ROWS = [f"{s}/{a}" for a in ("default", "none") for s in STRATEGIES]
AUGMENTED_CACHE_VIEWS = 4
PRESETS = ["none", "flip", "ten-crop"]

# zalando's Fashion-MNIST benchmark (github.com/zalandoresearch/fashion-mnist), test top-1
PUBLISHED_ANCHORS = {
    "SVC (sklearn, C=10, RBF)": 0.897,
    "2 conv + pooling + BN CNN": 0.916,
    "fastai ResNet50 fine-tune": 0.931,
    "ResNet18": 0.949,
    "MobileNet": 0.950,
}


def row_config(
    strategy: str, augmentation: str, data: Path, out: Path, arguments: argparse.Namespace
) -> FinetuneConfig:
    """The finetune config of one row of the study."""
    options: dict[str, Any] = {**STRATEGIES[strategy], **AUGMENTATIONS[augmentation]}
    if strategy == "features" and options["augment"]:
        options["cache_augmented_views"] = AUGMENTED_CACHE_VIEWS
    return FinetuneConfig(
        data_dir=str(data),
        out=str(out),
        epochs=arguments.epochs,
        patience=arguments.epochs,
        img_size=arguments.img_size,
        lr=arguments.lr,
        batch_size=arguments.batch_size,
        channels_last=True,  # 1.6x faster full fine-tuning on this CPU (measured)
        seed=arguments.seed,
        **options,
    )


def run_row(config: FinetuneConfig, test_dir: Path, batch_size: int) -> dict[str, Any]:
    """Train one row (or reuse its finished run folder) and evaluate it with each TTA preset."""
    out = Path(config.out)
    result_file = out / "study.json"
    if result_file.exists():
        if FinetuneConfig.from_yaml(out / "config.yaml") != config:
            raise SystemExit(f"{out} was run with another config: delete it or use another --work")
        return json.loads(result_file.read_text())
    if out.exists():  # an interrupted row of this study: start it again
        shutil.rmtree(out)
    summary = finetune(config, enable_progress_bar=False, limit_test_batches=0).to_dict()
    evaluations = {}
    for preset in PRESETS:
        if preset == "flip" and not trains_with_hflip(config):
            continue  # tlkit refuses it: the model never saw a mirror image
        result = evaluate(out, test_dir, batch_size, tta=preset)
        evaluations[preset] = {"top1": result["top1"], "seconds": result["tta"]["seconds"]}
        print(f"{out.name}: TTA {preset} top-1 {result['top1']:.4f}", flush=True)
    result = {"summary": summary, "tta": evaluations}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def results_table(results: dict[str, dict[str, Any]], heading: str) -> str:
    """The study as Markdown: one line per row, then the published anchors."""
    lines = [
        heading,
        "",
        "| strategy | augmentation | epochs | top-1 (no TTA) | flip | ten-crop | training (s) | "
        "eval none / flip / ten-crop (s) | trainable parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        strategy, augmentation = name.split("/")
        summary, tta = result["summary"], result["tta"]
        top1 = [f"{tta[preset]['top1']:.4f}" if preset in tta else "n/a" for preset in PRESETS]
        seconds = " / ".join(
            f"{tta[preset]['seconds']:.0f}" if preset in tta else "n/a" for preset in PRESETS
        )
        lines.append(
            f"| {strategy} | {augmentation} | {summary['epochs_run']} | {' | '.join(top1)} | "
            f"{summary['wall_time_s']:.0f} | {seconds} | {summary['trainable_parameters']:,} |"
        )
    best_name, best_preset = max(
        ((name, preset) for name in results for preset in results[name]["tta"]),
        key=lambda pair: results[pair[0]]["tta"][pair[1]]["top1"],
    )
    best = results[best_name]["tta"][best_preset]["top1"]
    lines += ["", f"Best: {best_name} with TTA {best_preset}, {best:.4f}.", ""]
    lines += ["| published anchor (zalando, full split) | test top-1 |", "|---|---|"]
    lines += [f"| {name} | {accuracy:.3f} |" for name, accuracy in PUBLISHED_ANCHORS.items()]
    return "\n".join(lines) + "\n"


def plot_learning_curves(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Validation top-1 per epoch, one panel per augmentation setting, one line per strategy."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    augmentations = [a for a in AUGMENTATIONS if any(n.endswith(f"/{a}") for n in results)]
    axes = figure.subplots(1, len(augmentations), sharey=True, squeeze=False)[0]
    for axis, augmentation in zip(axes, augmentations, strict=True):
        for name, result in results.items():
            strategy, row_augmentation = name.split("/")
            if row_augmentation != augmentation:
                continue
            history = result["summary"]["history"]
            axis.plot(
                [record["epoch"] for record in history],
                [record["val_acc"] for record in history],
                marker="o",
                label=strategy,
                color=f"C{list(STRATEGIES).index(strategy)}",  # one colour per strategy
            )
        axis.set_title(f"augmentation: {augmentation}")
        axis.legend()
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("validation top-1")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def row_folder(work: Path, row: str) -> Path:
    strategy, augmentation = row.split("/")
    return work / f"{strategy.replace(' ', '-')}-{augmentation}-augmentation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-fashion-mnist")
    parser.add_argument("--train-images", type=int, default=60000, help="of 60,000")
    parser.add_argument("--test-images", type=int, default=10000, help="of 10,000")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    rows = [f"{s}/{a}" for a in AUGMENTATIONS for s in STRATEGIES]
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=rows)
    parser.add_argument("--plot", default="docs/images/fashion-mnist-curves.png")
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = write_fashion_mnist(
        work / "data", arguments.train_images, arguments.test_images, arguments.seed
    )
    started = time.perf_counter()
    for row in arguments.rows:
        strategy, augmentation = row.split("/")
        config = row_config(strategy, augmentation, data, row_folder(work, row), arguments)
        run_row(config, data / "test", arguments.batch_size)

    finished = {
        row: json.loads((row_folder(work, row) / "study.json").read_text())
        for row in rows
        if (row_folder(work, row) / "study.json").exists()
    }
    (work / "results.json").write_text(json.dumps(finished, indent=2))
    heading = (
        f"Fashion-MNIST {arguments.train_images:,} train (10% held out for validation) / "
        f"{arguments.test_images:,} test, {arguments.img_size}px, lr {arguments.lr}, batch "
        f"{arguments.batch_size}; {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}; this invocation {time.perf_counter() - started:.0f} s"
    )
    table = results_table(finished, heading)
    (work / "results.md").write_text(table)
    print("\n" + table)
    plot_learning_curves(
        finished,
        Path(arguments.plot),
        f"Fashion-MNIST, {arguments.train_images:,} training images, {arguments.img_size}px",
    )
    print(f"learning curves: {arguments.plot}")


if __name__ == "__main__":
    main()
