"""`tlkit`: the command line, a thin shell over the Python API.

    tlkit [-v] COMMAND ...
    tlkit demo
    tlkit finetune DATA_DIR [--config run.yaml] [--print-config] [--sanity] [FinetuneConfig flags]
    tlkit sanity DATA_DIR [--config run.yaml] [flags of FinetuneConfig]
    tlkit search DATA_DIR --out DIR [--trials N] [--sampler random|tpe] [--refine] [--space FILE]
    tlkit evaluate RUN_DIR DATA [--out results.json] [--max-image-pixels N]
                   [--csv-paths-outside-root] [--verify full|header|none] [--scan-cache DIR]
    tlkit predict  RUN_DIR IMAGE_OR_FOLDER... [--top-k 3] [--threshold P] [--out preds.csv]
                   [--max-image-pixels N]
    tlkit report   RUN_DIR [DATA] [--out RUN_DIR/report] [--mistakes 16] [--max-image-pixels N]
                   [--csv-paths-outside-root] [--verify full|header|none] [--scan-cache DIR]
    tlkit export   RUN_DIR --format onnx|torchscript|safetensors --out EXPORT_DIR
    tlkit convert  DATA OUT [--workers N] [--chunk-bytes SIZE] [--seed S] [--val-fraction F]
                   [--test-fraction F]

A dataset written by `tlkit convert` (LitData shards; OUT may be an s3:// or gs:// URL) is
accepted wherever DATA_DIR or DATA is: finetune, sanity, search, evaluate, predict, report.

evaluate and predict also take an EXPORT_DIR in place of RUN_DIR. --max-image-pixels,
--csv-paths-outside-root, --verify and --scan-cache default to the run's own (its config.yaml).

The finetune flags are generated from `FinetuneConfig`'s fields (names, types, defaults, help),
so the CLI, YAML files and the Python API cannot drift apart. Precedence: defaults < --config
file < flags.

A user's mistake (a `TlkitError`) ends the command with one line on standard error and exit
status 2; any other exception is a bug and shows its traceback. Modules are imported by the
command that needs them, so that building the parser (and `--help`) loads no torch.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from tlkit.choices import (
    EXPORT_FORMATS,
    SANITY_OVERFIT_STEPS,
    SANITY_SAMPLES_PER_CLASS,
    SEARCH_SAMPLERS,
    SHARD_CHUNK_BYTES,
    TTA_AUTO,
    TTA_CHOICES,
    VERIFY_MODES,
)
from tlkit.config import FinetuneConfig, read_yaml_mapping
from tlkit.console import configure_logging
from tlkit.errors import DatasetError, RunFolderError, TlkitError, TrainingDivergedError

TTA_HELP = (
    f"test-time averaging preset (default: none); {TTA_AUTO}: the preset the run chose on its "
    "validation split when training ended (none for runs that recorded no choice)"
)


def add_config_flags(
    parser: argparse.ArgumentParser,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> None:
    """One flag per FinetuneConfig field (or per field in `only`); unset flags stay out of the
    namespace."""
    hints = typing.get_type_hints(FinetuneConfig)
    for field in dataclasses.fields(FinetuneConfig):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        kind = hints[field.name]
        if type(None) in typing.get_args(kind):  # `int | None`: the flag takes an int
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        flag = "--" + field.name.replace("_", "-")
        options: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "dest": field.name,
            "help": field.metadata["help"]
            + (f" (default: {field.default})" if field.default not in ("", None) else ""),
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["type"] = kind
        parser.add_argument(flag, **options)


def config_from_arguments(arguments: argparse.Namespace) -> FinetuneConfig:
    """Defaults, then the --config file (with --resume: the run's own config.yaml), then the
    flags given on the command line."""
    values: dict[str, Any] = {}
    config_file = arguments.config
    if getattr(arguments, "resume", False) and not config_file:
        from tlkit.runfolder import CONFIG

        config_file = Path(getattr(arguments, "out", FinetuneConfig.out)) / CONFIG
        if not config_file.is_file():
            raise RunFolderError(f"nothing to resume: {config_file} does not exist")
    if config_file:
        values.update(read_yaml_mapping(config_file, "config keys"))
    field_names = {field.name for field in dataclasses.fields(FinetuneConfig)}
    values.update({k: v for k, v in vars(arguments).items() if k in field_names})
    if getattr(arguments, "data", None):
        values["data_dir"] = arguments.data
    return FinetuneConfig.from_dict(values)


def _finetune(arguments: argparse.Namespace) -> int:
    config = config_from_arguments(arguments)
    if arguments.print_config:
        print(config.to_yaml(explain_open=True), end="")
        return 0
    from tlkit.train.finetune import finetune

    if arguments.sanity and _sanity_checks_fail(config):
        print("tlkit finetune: a sanity check failed; not training", file=sys.stderr)
        return 1
    finetune(config, resume=arguments.resume, started=arguments.started)
    return 0


def _sanity_checks_fail(config: FinetuneConfig, **options: int) -> bool:
    """Run the sanity checks and print their report; True if one failed."""
    from tlkit.commands.sanity import report_lines, run_sanity_checks

    results = run_sanity_checks(config, **options)
    print("\n".join(report_lines(results)), flush=True)
    return not all(result.passed for result in results)


def _sanity(arguments: argparse.Namespace) -> int:
    config = config_from_arguments(arguments)
    options = {"per_class": arguments.per_class, "overfit_steps": arguments.overfit_steps}
    return 1 if _sanity_checks_fail(config, **options) else 0


def _search(arguments: argparse.Namespace) -> int:
    from tlkit.commands.search import load_space, run_search

    space, base = load_space(arguments.space, config_from_arguments(arguments))
    run_search(base, arguments.trials, arguments.sampler, arguments.refine, space)
    return 0


def _demo(arguments: argparse.Namespace) -> int:
    from tlkit.commands.demo import demo_config, run_demo

    overrides = {"epochs": arguments.epochs} if arguments.epochs is not None else {}
    config = demo_config(arguments.out, **overrides)
    summary, baseline = run_demo(config)
    settings = ", ".join(f"{name}={value:.3g}" for name, value in baseline.settings.items())
    print(
        f"Demo finished; test accuracy on "
        f"{summary.test_images} held-out patches (run folder {config.out}):\n"
        f"  transfer learning, {summary.backbone} ({summary.strategy}): {summary.test_acc:.4f} "
        f"in {summary.wall_time_s:.0f} s\n"
        f"  classic baseline, {baseline.method} ({settings}): {baseline.test_acc:.4f} "
        f"in {baseline.seconds:.0f} s"
    )
    return 0


def _convert(arguments: argparse.Namespace) -> int:
    from tlkit.data.shards import convert

    config = config_from_arguments(arguments)
    converted = convert(
        arguments.data,
        arguments.out,
        workers=arguments.workers or min(8, os.cpu_count() or 1),
        chunk_bytes=arguments.chunk_bytes,
        seed=config.seed,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        max_image_pixels=config.max_image_pixels,
        csv_paths_outside_root=config.csv_paths_outside_root,
        overwrite=arguments.overwrite,
    )
    counts = ", ".join(f"{count} {split}" for split, count in converted.counts.items())
    skipped = converted.metadata["skipped_files"]
    print(
        f"converted {arguments.data} to {arguments.out}: {counts} images of "
        f"{len(converted.classes)} classes" + (f", {skipped} files skipped" if skipped else "")
    )
    return 0


def _evaluate(arguments: argparse.Namespace) -> int:
    from tlkit.infer.predict import evaluate

    results = evaluate(
        arguments.run,
        arguments.data,
        arguments.batch_size,
        arguments.accelerator,
        arguments.tta,
        arguments.max_image_pixels,
        arguments.csv_paths_outside_root,
        arguments.verify,
        arguments.scan_cache,
    )
    text = json.dumps(results, indent=2)
    if arguments.out:
        Path(arguments.out).write_text(text + "\n")
    print(text)
    return 0


def _predict(arguments: argparse.Namespace) -> int:
    from tlkit.infer.predict import predict

    rows, skipped, other_files = predict(
        arguments.run,
        arguments.inputs,
        arguments.top_k,
        arguments.batch_size,
        arguments.accelerator,
        arguments.tta,
        arguments.max_image_pixels,
        arguments.threshold,
    )
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} unreadable files", file=sys.stderr)
    for line in other_files.messages():
        print(line, file=sys.stderr)
    if not rows:
        raise DatasetError("no readable image among the inputs")
    handle = open(arguments.out, "w", newline="") if arguments.out else sys.stdout
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    if arguments.out:
        handle.close()
        print(f"wrote {len(rows)} predictions to {arguments.out}", file=sys.stderr)
    return 0


def _report(arguments: argparse.Namespace) -> int:
    from tlkit.commands.report import build_report

    report = build_report(
        arguments.run,
        arguments.data,
        arguments.out,
        arguments.mistakes,
        arguments.batch_size,
        arguments.accelerator,
        arguments.tta,
        arguments.max_image_pixels,
        arguments.csv_paths_outside_root,
        arguments.verify,
        arguments.scan_cache,
    )
    evaluation = report.evaluation
    if evaluation is not None:
        print(f"{evaluation.headline()}, {len(evaluation.skipped)} skipped", file=sys.stderr)
    print(f"wrote {report.page} and {len(report.figures)} figures beside it")
    return 0


def _export(arguments: argparse.Namespace) -> int:
    from tlkit.infer.export import CARD, export_run

    card = export_run(arguments.run, arguments.out, arguments.format)
    verification = card["verification"]
    print(
        f"exported {card['format']} model to {Path(arguments.out) / card['model_file']} "
        f"(card {Path(arguments.out) / CARD}); verified on {verification['inputs']}: "
        f"max |probability difference| {verification['max_abs_difference']:.2e} "
        f"(tolerance {verification['tolerance']:.0e})"
    )
    return 0


def positive_integer(text: str) -> int:
    """argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_image_limit_flags(parser: argparse.ArgumentParser, csv_input: bool = True) -> None:
    """--max-image-pixels (and for labelled CSV input --csv-paths-outside-root); unset, the
    run's own values apply."""
    parser.add_argument(
        "--max-image-pixels",
        type=positive_integer,
        default=None,
        help="images with more pixels are skipped as decompression bombs (default: the run's)",
    )
    if csv_input:
        parser.add_argument(
            "--csv-paths-outside-root",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="allow CSV rows whose paths leave the CSV's folder (default: the run's)",
        )


def add_scan_flags(parser: argparse.ArgumentParser) -> None:
    """--verify and --scan-cache for commands that scan labelled data; unset, the run's own
    values apply."""
    parser.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default=None,
        help="what the scan checks of every image up front (default: the run's)",
    )
    parser.add_argument(
        "--scan-cache", default=None, help="folder of the scan indexes (default: the run's)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlkit", description=__doc__.split("\n")[0])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Lightning's notices and warnings, other libraries' INFO messages and "
        "tlkit's debug lines",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="texture patches of scikit-image's photos: a classic baseline, then transfer "
        "learning from bundled EfficientNet-Lite0 on the same split",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--epochs", type=int, default=None, help="override the epochs auto chooses")
    demo.set_defaults(handler=_demo)

    finetune = commands.add_parser("finetune", help="fine-tune a pretrained backbone")
    finetune.add_argument("data", nargs="?", help="image folder or path,label CSV")
    finetune.add_argument("--config", help="YAML file of config keys; flags override it")
    finetune.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    finetune.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.ckpt, with its saved config.yaml",
    )
    finetune.add_argument(
        "--sanity", action="store_true", help="run `tlkit sanity` first; stop if a check fails"
    )
    add_config_flags(finetune, skip=("data_dir",))
    finetune.set_defaults(handler=_finetune)

    sanity = commands.add_parser(
        "sanity",
        help="checks before training: loss at init, overfit a tiny subset, activations, gradients",
    )
    sanity.add_argument("data", nargs="?", help="image folder or path,label CSV")
    sanity.add_argument("--config", help="YAML file of config keys; flags override it")
    sanity.add_argument(
        "--per-class",
        type=int,
        default=SANITY_SAMPLES_PER_CLASS,
        help="images per class for the checks (default %(default)s)",
    )
    sanity.add_argument(
        "--overfit-steps",
        type=int,
        default=SANITY_OVERFIT_STEPS,
        help="step budget to fit the subset to 99%% train accuracy (default %(default)s)",
    )
    add_config_flags(sanity, skip=("data_dir", "out"))
    sanity.set_defaults(handler=_sanity)

    search = commands.add_parser("search", help="random hyperparameter search (Optuna)")
    search.add_argument("data", nargs="?", help="image folder or path,label CSV")
    search.add_argument("--config", help="YAML file of base config keys; flags override it")
    search.add_argument(
        "--out", required=True, help="search folder: study.db, trials/, trials.csv, best.yaml"
    )
    search.add_argument("--trials", type=int, default=20, help="trials per round (default 20)")
    search.add_argument(
        "--sampler", choices=SEARCH_SAMPLERS, default="random", help="default: random"
    )
    search.add_argument(
        "--refine", action="store_true", help="a second round narrowed around the best trials"
    )
    search.add_argument("--space", help="YAML file overriding the default search space")
    add_config_flags(search, skip=("data_dir", "out"))
    search.set_defaults(handler=_search)

    convert = commands.add_parser(
        "convert",
        help="write an image folder or CSV as LitData shards, for streaming on many machines",
    )
    convert.add_argument("data", help="image folder or path,label CSV, split as finetune splits it")
    convert.add_argument(
        "out", help="new folder, or an s3:// or gs:// URL, for the train/, val/ (, test/) shards"
    )
    convert.add_argument("--config", help="YAML file of config keys (the split's seed, ...)")
    convert.add_argument(
        "--workers",
        type=positive_integer,
        default=None,
        help="processes writing shards (default: one per CPU core, at most 8)",
    )
    convert.add_argument(
        "--chunk-bytes",
        default=SHARD_CHUNK_BYTES,
        help="size of a shard chunk file (default: %(default)s, LitData's default)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace a finished conversion in OUT"
    )
    add_config_flags(
        convert,
        only=(
            "seed",
            "val_fraction",
            "test_fraction",
            "max_image_pixels",
            "csv_paths_outside_root",
        ),
    )
    convert.set_defaults(handler=_convert)

    for name, helptext in (
        ("evaluate", "metrics of a run on labelled data"),
        ("predict", "top-k predictions for images"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("run", help="run folder (tlkit finetune) or export folder (tlkit export)")
        if name == "evaluate":
            sub.add_argument("data", help="labelled image folder or path,label CSV")
            sub.add_argument("--out", help="also write the JSON to this file")
            sub.set_defaults(handler=_evaluate)
        else:
            sub.add_argument("inputs", nargs="+", help="image files or folders")
            sub.add_argument(
                "--top-k",
                type=positive_integer,
                default=3,
                help="labels per image, at most the number of classes (default 3)",
            )
            sub.add_argument(
                "--threshold",
                type=float,
                default=None,
                help="multi-label models: predict every class whose probability is at least "
                "this, for all classes (default: each class's threshold, chosen on validation)",
            )
            sub.add_argument("--out", help="CSV file (default: standard output)")
            sub.set_defaults(handler=_predict)
        add_image_limit_flags(sub, csv_input=name == "evaluate")
        if name == "evaluate":
            add_scan_flags(sub)
        sub.add_argument("--batch-size", type=int, default=64, help="images per batch")
        sub.add_argument(
            "--accelerator", default="auto", help="auto, cpu or gpu (exported models: cpu)"
        )
        sub.add_argument("--tta", default="none", choices=TTA_CHOICES, help=TTA_HELP)

    report = commands.add_parser(
        "report",
        help="HTML page: learning curves, per-class scores, confusions or precision-recall "
        "curves, worst mistakes, run card",
    )
    report.add_argument("run", help="run folder written by tlkit finetune")
    report.add_argument(
        "data",
        nargs="?",
        help="labelled image folder or path,label CSV (default: the run's DATA_DIR/test, if any)",
    )
    report.add_argument("--out", help="folder for report.html and its PNGs (default: RUN/report)")
    report.add_argument(
        "--mistakes", type=int, default=16, help="highest-loss wrong predictions shown (default 16)"
    )
    report.add_argument("--batch-size", type=int, default=64, help="images per batch")
    report.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    report.add_argument("--tta", default="none", choices=TTA_CHOICES, help=TTA_HELP)
    add_image_limit_flags(report)
    add_scan_flags(report)
    report.set_defaults(handler=_report)

    export = commands.add_parser("export", help="ONNX/TorchScript/safetensors model + card")
    export.add_argument("run", help="run folder written by tlkit finetune")
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="onnx",
        help="onnx (needs the [onnx] extra), torchscript or safetensors (default: onnx)",
    )
    export.add_argument("--out", required=True, help="new folder for the model and card.json")
    export.set_defaults(handler=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A run's clock (--budget, summary.json's wall time) starts with the command, so that
    # importing torch, Lightning and timm counts: 7-8 s on the 2-core CPU machine, 15 s on a
    # GPU machine, measured here.
    started = time.perf_counter()
    arguments = build_parser().parse_args(argv)
    arguments.started = started
    configure_logging(arguments.verbose)
    try:
        return arguments.handler(arguments)
    except TrainingDivergedError as error:  # the set-up ran as asked; its outcome failed
        print(f"tlkit {arguments.command}: {error}", file=sys.stderr)
        return 1
    except TlkitError as error:
        print(f"tlkit {arguments.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
