"""Channels-last against the default memory layout on this CPU: the CPU time of a training step
and of a forward pass of tlkit's model, the two layouts alternating.

    apt-get install dataset-fashion-mnist
    python benchmarks/channels_last.py --strategies partial full --sizes 64 224 --repeats 3

For each strategy (--strategies: partial with its last 2 stages, full) and input size
(--sizes: 64 px, Fashion-MNIST; 224 px, photo crops; the data of benchmarks/epoch.py), the
same model (bundled EfficientNet-Lite0 and tlkit's head, one seed) is built twice, in the
default layout and in channels-last, with tlkit's optimiser and schedule, and steps (forward,
cross-entropy, backward, optimiser and schedule steps, as benchmarks/epoch.py's step rate) on
--preloaded batches of the run's training loader; the forward pass (eval mode, no gradients)
is validation's and feature extraction's step. The layouts take turns, --steps steps at a
time, --repeats times; the table gives the median CPU time of this process per step, on
--threads torch threads (1 by default: CPU time then counts one core's work, so other work on
the machine moves it less than wall time).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from epoch import STRATEGIES, write_fashion_mnist_splits, write_photo_crops

from tlkit import FinetuneConfig
from tlkit.train.build import build_datamodule, build_model, data_facts

LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}


def prepared_model(config: FinetuneConfig, layout: torch.memory_format, preloaded: int):
    """The run's model in `layout`, its optimiser and schedule, and batches in that layout."""
    pl.seed_everything(config.seed, verbose=False)
    datamodule = build_datamodule(replace(config, num_workers=0))
    datamodule.setup("fit")
    config = replace(config, channels_last=layout == torch.channels_last)
    model = build_model(config, data_facts(config, datamodule))
    optimizer, schedule = model.optimizer_and_schedule(total_steps=1000, steps_per_epoch=100)
    model = model.to(memory_format=layout)
    batches = [
        (images.contiguous(memory_format=layout), labels)
        for images, labels in itertools.islice(datamodule.train_dataloader(), preloaded)
    ]
    return model, optimizer, schedule, batches


def cpu_seconds_per_step(prepared, steps: int, forward_only: bool) -> float:
    """This process's CPU seconds per training step (or forward pass) over `steps` of them."""
    model, optimizer, schedule, batches = prepared
    started = time.process_time()
    for images, labels in itertools.islice(itertools.cycle(batches), steps):
        if forward_only:
            with torch.no_grad():
                model.eval()(images)
            continue
        model.train()  # frozen backbone modules stay in eval mode (TransferClassifier.train)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return (time.process_time() - started) / steps


def compare(config: FinetuneConfig, arguments: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median CPU seconds per training step and per forward pass, by layout."""
    prepared = {
        name: prepared_model(config, layout, arguments.preloaded)
        for name, layout in LAYOUTS.items()
    }
    times: dict[str, dict[str, list[float]]] = {
        name: {"step": [], "forward": []} for name in LAYOUTS
    }
    for name in LAYOUTS:  # warm-up: oneDNN picks its kernels on first use
        cpu_seconds_per_step(prepared[name], 1, forward_only=False)
        cpu_seconds_per_step(prepared[name], 1, forward_only=True)
    for repeat in range(arguments.repeats):
        order = list(LAYOUTS) if repeat % 2 == 0 else list(reversed(LAYOUTS))
        for name in order:
            for kind in ("step", "forward"):
                seconds = cpu_seconds_per_step(prepared[name], arguments.steps, kind == "forward")
                times[name][kind].append(seconds)
    return {
        name: {kind: statistics.median(values) for kind, values in kinds.items()}
        for name, kinds in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-epoch")
    parser.add_argument(
        "--strategies", nargs="+", default=["partial", "full"], choices=["partial", "full"]
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224], choices=[64, 224])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="steps per turn of a layout")
    parser.add_argument("--repeats", type=int, default=3, help="turns of each layout")
    parser.add_argument("--preloaded", type=int, default=2, help="batches the steps cycle over")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    work = Path(arguments.work)
    datasets = {
        64: lambda: write_fashion_mnist_splits(work / "fashion-mnist", 640, 128),
        224: lambda: write_photo_crops(work / "photos", 128, 32),
    }
    rows = []
    for size in arguments.sizes:
        data = datasets[size]()
        for strategy in arguments.strategies:
            config = FinetuneConfig(
                data_dir=str(data),
                out=str(work / "runs" / "channels-last"),
                pretrained="bundled",
                img_size=size,
                batch_size=arguments.batch_size,
                cache=False,
                **STRATEGIES[strategy],
            )
            median = compare(config, arguments)
            plain, last = median["default"], median["channels-last"]
            rows.append(
                f"| {strategy} | {size} | {1000 * plain['step']:.0f} | {1000 * last['step']:.0f} "
                f"| {plain['step'] / last['step']:.2f} | {1000 * plain['forward']:.0f} | "
                f"{1000 * last['forward']:.0f} | {plain['forward'] / last['forward']:.2f} |"
            )
            print(rows[-1], flush=True)
    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{arguments.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}; batch "
        f"{arguments.batch_size}, {arguments.repeats} turns of {arguments.steps} steps\n"
    )
    print(
        "| strategy | px | step CPU ms, default | step CPU ms, channels-last | step ratio | "
        "forward CPU ms, default | forward CPU ms, channels-last | forward ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
