"""What the command line shows: user errors in one line, real bugs with their traceback, a
quiet console (Lightning's notices at -v only), library modules that log rather than print, and
a parser that loads no heavy module."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN_FLAGS

from tlkit.cli import main
from tlkit.console import ConsoleHandler

# Lightning's start-up notices and warnings that a default tlkit run hides (issue 17).
LIGHTNING_NOTICES = (
    "GPU available",
    "TPU available",
    "litlogger",
    "LeafSpec",
    "log_every_n_steps",
    "Previous log files in this directory will be deleted",
    "exists and is not empty",
)


def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys):
    missing_config = ["finetune", "--config", str(tmp_path / "none.yaml"), "--print-config"]
    for arguments in (
        missing_config,
        ["finetune", str(tmp_path), "--lr", "-1", "--print-config"],
        ["predict", str(tmp_path), str(tmp_path / "x.png")],
    ):
        assert main(arguments) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith(f"tlkit {arguments[0]}: error: "), error
        assert error.count("\n") == 1, error


def test_a_programming_error_keeps_its_traceback(tiny_run: Path, colour_folder: Path, monkeypatch):
    import tlkit.infer.predict

    def broken(*arguments, **options):
        raise ValueError("a bug deep inside, not the user's doing")

    monkeypatch.setattr(tlkit.infer.predict, "evaluate", broken)
    with pytest.raises(ValueError, match="a bug deep inside"):
        main(["evaluate", str(tiny_run), str(colour_folder / "test")])


def test_every_user_facing_error_is_a_tlkit_error():
    from tlkit.errors import (
        DatasetError,
        ExportError,
        RunFolderError,
        TlkitError,
        TrainingDivergedError,
        UnsafeCheckpointError,
        WeightsUnavailableError,
    )

    for error in (
        DatasetError,
        WeightsUnavailableError,
        RunFolderError,
        UnsafeCheckpointError,
        ExportError,
        TrainingDivergedError,
    ):
        assert issubclass(error, TlkitError), error


def _finetune_console(data: Path, out: Path, verbose: bool) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tlkit.cli", *(["-v"] if verbose else []), "finetune"]
    command += [str(data), "--out", str(out), *TINY_RUN_FLAGS, "--epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_default_run_shows_settings_epochs_and_summary_not_lightning_notices(
    colour_folder: Path, tmp_path: Path
):
    quiet = _finetune_console(colour_folder, tmp_path / "quiet", verbose=False)
    console = quiet.stdout + quiet.stderr
    for notice in LIGHTNING_NOTICES:
        assert notice not in console, notice
    assert "Settings: tf_efficientnet_lite0 (bundled weights), strategy partial" in quiet.stdout
    assert "Effective batch size 8 (8 per device x 1 processes" in quiet.stdout
    assert "Finished epoch 1 / 1: loss " in quiet.stdout
    assert "Best val " in quiet.stdout and "Sanity Checking" not in console
    assert quiet.stderr.strip() == "", quiet.stderr

    verbose = _finetune_console(colour_folder, tmp_path / "verbose", verbose=True)
    console = verbose.stdout + verbose.stderr
    for notice in ("GPU available", "litlogger", "Previous log files", "exists and is not empty"):
        assert notice in console, notice
    assert "Finished epoch 1 / 1: loss " in verbose.stdout


def test_finetune_logs_instead_of_printing(colour_folder: Path, tmp_path: Path, capsys, caplog):
    from tlkit.config import FinetuneConfig
    from tlkit.train.finetune import finetune

    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        epochs=1,
        pretrained="bundled",
        img_size=32,
        batch_size=8,
        num_workers=0,
        val_fraction=0.3,
    )
    root = logging.getLogger()
    console = [handler for handler in root.handlers if isinstance(handler, ConsoleHandler)]
    for handler in console:  # set up by an earlier in-process `main` call
        root.removeHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="tlkit"):
            finetune(config, enable_progress_bar=False)
    finally:
        for handler in console:
            root.addHandler(handler)
    printed = capsys.readouterr()
    assert "Finished epoch" not in printed.out + printed.err
    assert "Best val" not in printed.out + printed.err
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("Finished epoch 1 / 1") for message in messages)
    assert any(message.startswith("Best val") for message in messages)


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_tlkit_installs_no_warnings_filter():
    """tlkit hides Lightning's expected warnings only around its own training (console.py)."""
    code = (
        "import json, warnings; "
        "import tlkit.model.classifier, tlkit.train.finetune, tlkit.commands.sanity; "
        "from tlkit.console import EXPECTED_LIGHTNING_WARNINGS as hidden; "
        "print(json.dumps([f[1].pattern for f in warnings.filters if f[1] "
        "and f[1].pattern in hidden]))"
    )
    assert json.loads(_run_python(code)) == []


def test_building_the_parser_imports_no_heavy_module():
    heavy = [
        "optuna",
        "tlkit.commands.search",
        "tlkit.commands.sanity",
        "tlkit.infer.export",
        "onnx",
        "torch",
        "timm",
    ]
    code = (
        "import json, sys; import tlkit.cli; tlkit.cli.build_parser(); "
        f"print(json.dumps([name for name in {heavy!r} if name in sys.modules]))"
    )
    assert json.loads(_run_python(code)) == []


def test_importing_tlkit_asks_no_server_for_updates():
    """albumentations' check for a newer release of itself (a PyPI request) stays off."""
    code = (
        "import os, urllib.request; os.environ.pop('NO_ALBUMENTATIONS_UPDATE', None); "
        "urllib.request.OpenerDirector.open = lambda *args, **kwargs: os._exit(3); "
        "import tlkit.data.augment; print('imported')"
    )
    assert _run_python(code).strip() == "imported"


def test_the_parser_offers_the_implemented_export_formats():
    from tlkit.choices import EXPORT_FORMATS
    from tlkit.infer.export import FORMATS

    assert tuple(FORMATS) == EXPORT_FORMATS


def test_the_package_names_load_on_first_use():
    code = (
        "import sys, tlkit; assert 'tlkit.commands.search' not in sys.modules; "
        "assert set(tlkit.__all__) <= set(dir(tlkit)); "
        "from tlkit import run_search, ExportedModel; "
        "print(run_search.__module__, ExportedModel.__module__)"
    )
    assert _run_python(code).split() == ["tlkit.commands.search", "tlkit.infer.export"]
