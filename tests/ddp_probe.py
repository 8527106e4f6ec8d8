"""A `tlkit.train.finetune` run that records, per process, what the distributed tests check.

Run as `python ddp_probe.py CONFIG_JSON PROBE_DIR` (Lightning's launcher starts the second
process by running this script again) or under `torchrun`. It writes, for each rank:

- `rank<R>-epoch<E>.pt`: the first training batch's images of epoch E;
- `rank<R>.json`: training batches per epoch, a fingerprint of every training image per epoch,
  the validation images per epoch, the Trainer's estimated optimiser steps, and the feature rows
  this process extracted.

Feature extraction is slowed down by EXTRACTION_DELAY_S, so that the processes overlap as they
would on a real dataset (on the tests' 40 images it takes a moment).
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from tlkit.config import FinetuneConfig
from tlkit.train import features
from tlkit.train.finetune import finetune

EXTRACTION_DELAY_S = 3.0


def fingerprint(image: torch.Tensor) -> str:
    """Identifies an image tensor (rounded, so that equal pixels match across processes)."""
    return hashlib.sha1((image * 1000).round().to(torch.int64).numpy().tobytes()).hexdigest()


class RecordBatches(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.batches_per_epoch: list[int] = []
        self.train_images: list[list[str]] = []
        self.val_images: list[int] = []
        self.estimated_steps = 0
        self.rank = 0

    def on_fit_start(self, trainer, module) -> None:
        self.rank = trainer.global_rank
        self.estimated_steps = trainer.estimated_stepping_batches

    def on_train_epoch_start(self, trainer, module) -> None:
        self.batches_per_epoch.append(0)
        self.train_images.append([])

    def on_train_batch_start(self, trainer, module, batch, batch_index: int) -> None:
        if batch_index == 0:
            name = f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.pt"
            torch.save(batch[0].cpu(), self.folder / name)
        self.batches_per_epoch[-1] += 1
        self.train_images[-1] += [fingerprint(image) for image in batch[0].cpu()]

    def on_validation_epoch_start(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.val_images.append(0)

    def on_validation_batch_start(self, trainer, module, batch, batch_index: int, *_) -> None:
        if not trainer.sanity_checking:
            self.val_images[-1] += len(batch[1])


def main() -> None:
    config = FinetuneConfig.from_dict(json.loads(sys.argv[1]))
    folder = Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    extracted_rows: list[int] = []
    extract = features.extract

    def counted_extract(backbone, dataset, *arguments, **options):
        extracted_rows.append(len(dataset))
        time.sleep(EXTRACTION_DELAY_S)
        return extract(backbone, dataset, *arguments, **options)

    features.extract = counted_extract
    recorder = RecordBatches(folder)
    finetune(config, callbacks=[recorder], enable_progress_bar=False)
    record = {
        "batches_per_epoch": recorder.batches_per_epoch,
        "train_images": recorder.train_images,
        "val_images": recorder.val_images,
        "estimated_steps": recorder.estimated_steps,
        "extracted_rows": extracted_rows,
    }
    (folder / f"rank{recorder.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
