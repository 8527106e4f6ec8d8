"""Auto's choices checked by training: auto against auto with one choice overridden.

    apt-get install dataset-fashion-mnist
    python benchmarks/auto_overrides.py --datasets digits "Fashion-MNIST 600" \
        --overrides backbone_lr_scale=0.1

For each dataset (benchmarks/auto_evidence.py's: Fashion-MNIST subsets, scikit-learn's digits,
scikit-image texture patches), one `tlkit.train.finetune` run with every choice left to
`--strategy auto`, then one run per override (`FIELD=VALUE`, a FinetuneConfig field auto
chooses) with everything else still auto's. Bundled EfficientNet-Lite0, tlkit's defaults
otherwise. Prints a Markdown table (auto's choices, best validation top-1, test top-1 where the
dataset has a test split, wall time) and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import typing
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_evidence import DATASETS  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402
from tlkit.config import FIXED_CHOICES, coerce_value  # noqa: E402

SHOWN_CHOICES = ("strategy", "unfreeze_stages", "backbone_lr_scale", "epochs", "img_size")


def parse_override(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` for a field auto chooses, the value coerced to the field's type."""
    name, _, value = text.partition("=")
    if name not in FIXED_CHOICES or not value:
        raise SystemExit(f"override '{text}': give FIELD=VALUE, FIELD one of {list(FIXED_CHOICES)}")
    return name, coerce_value(name, value, typing.get_type_hints(FinetuneConfig)[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-auto-overrides")
    parser.add_argument("--datasets", nargs="+", default=["digits", "Fashion-MNIST 600"])
    parser.add_argument("--overrides", nargs="+", default=["backbone_lr_scale=0.1"])
    arguments = parser.parse_args()
    overrides = [parse_override(text) for text in arguments.overrides]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(arguments.work)
    rows = []
    for dataset in arguments.datasets:
        folder, write, val_fraction = DATASETS[dataset]
        data = write(work / folder)
        for label, override in [("auto", {}), *((f"{n}={v}", {n: v}) for n, v in overrides)]:
            out = work / "runs" / folder / label
            config = FinetuneConfig(
                data_dir=str(data),
                out=str(out),
                pretrained="bundled",
                val_fraction=val_fraction,
                **override,
            )
            summary = finetune(config, enable_progress_bar=False).to_dict()
            decided = summary["auto_decision"]["choices"]  # the others were given
            chosen = {
                name: decided[name]["value"] if name in decided else getattr(config, name)
                for name in SHOWN_CHOICES
            }
            rows.append({"dataset": dataset, "row": label, "chosen": chosen, "summary": summary})
            (work / "results.json").write_text(json.dumps(rows, indent=2))
            print(f"{dataset} {label}: val {summary['best_val_acc']:.4f}", file=sys.stderr)

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| dataset | row | " + " | ".join(SHOWN_CHOICES) + " | best val | test | wall (s) |")
    print("|---" * (len(SHOWN_CHOICES) + 5) + "|")
    for row in rows:
        summary = row["summary"]
        test = f"{summary['test_acc']:.4f}" if summary["test_acc"] is not None else "-"
        values = " | ".join(str(row["chosen"].get(name, "-")) for name in SHOWN_CHOICES)
        print(
            f"| {row['dataset']} | {row['row']} | {values} | {summary['best_val_acc']:.4f} | "
            f"{test} | {summary['wall_time_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
