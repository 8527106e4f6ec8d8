"""What a tlkit command shows on the console, and at which verbosity.

Library modules log through `logging` under the ``tlkit`` logger and never print; the command
line calls `configure_logging` once. By default it shows tlkit's INFO lines on standard output
and warnings on standard error (written through tqdm, so that they never tear a progress bar),
and hides Lightning's start-up notices (its INFO messages) and the Lightning warnings in
`EXPECTED_LIGHTNING_WARNINGS`; `-v` shows them all, and tlkit's DEBUG lines.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("tlkit")

# Lightning's own loggers: hardware ("GPU available: ..."), the cloud-logging tip, "Trainer.fit
# stopped", checkpoint restores.
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")

# Warnings Lightning gives on every tlkit run that ask nothing of the user (regular expressions
# matched at the start of the message, as `warnings.filterwarnings` does).
EXPECTED_LIGHTNING_WARNINGS = (
    # tlkit writes config.yaml and split.csv into the run folder before training starts, and
    # puts earlier epochs back into metrics.csv itself on --resume: nothing is lost.
    r"Experiment logs directory .* exists and is not empty",
    r"Checkpoint directory .* exists and is not empty",
    # Lightning's internals calling a torch API that torch deprecated.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # A frozen backbone (strategy features or partial) stays in eval mode on purpose (module.py).
    r".*module\(s\) in eval mode at the start of training",
    # Converted datasets (shards.py): LitData's StreamingDataset gives each process and loader
    # worker its own share itself, so its length per process is right.
    r"Your `IterableDataset` has `__len__` defined",
)


class ConsoleHandler(logging.Handler):
    """INFO and DEBUG lines to standard output, warnings and errors to standard error, each
    through `tqdm.write`, which lifts active progress bars out of the way and redraws them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(verbose: bool = False) -> None:
    """The command line's console: one `ConsoleHandler` on the root logger (replacing one that
    an earlier call added), tlkit at INFO (DEBUG when verbose), Lightning's loggers at WARNING
    (INFO when verbose), other libraries' loggers at WARNING (INFO when verbose)."""
    # Lightning sets its loggers to INFO when it is imported: import it first, set them after.
    import pytorch_lightning  # noqa: F401

    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if isinstance(handler, ConsoleHandler)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleHandler())
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


@contextmanager
def expected_lightning_warnings_hidden() -> Iterator[None]:
    """Inside the block, hide `EXPECTED_LIGHTNING_WARNINGS`, unless tlkit logs at DEBUG (-v)."""
    with warnings.catch_warnings():
        if not logger.isEnabledFor(logging.DEBUG):
            for message in EXPECTED_LIGHTNING_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
        yield
