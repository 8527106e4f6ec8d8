"""A `tlkit.finetune` run that records, per process, what the distributed tests check.

Run as `python ddp_probe.py CONFIG_JSON PROBE_DIR` (Lightning's launcher starts the second
process by running this script again) or under `torchrun`. It writes, for each rank:

- `rank<R>-epoch<E>.pt`: the first training batch's images of epoch E;
- `rank<R>.json`: training batches per epoch, and the feature rows this process extracted.

Feature extraction is slowed down by EXTRACTION_DELAY_S, so that the processes overlap as they
would on a real dataset (on the tests' 40 images it takes a moment).
"""

import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from tlkit import features
from tlkit.config import FinetuneConfig
from tlkit.finetune import finetune

EXTRACTION_DELAY_S = 3.0


class RecordBatches(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.batches_per_epoch: list[int] = []
        self.rank = 0

    def on_fit_start(self, trainer, module) -> None:
        self.rank = trainer.global_rank

    def on_train_epoch_start(self, trainer, module) -> None:
        self.batches_per_epoch.append(0)

    def on_train_batch_start(self, trainer, module, batch, batch_index: int) -> None:
        if batch_index == 0:
            name = f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.pt"
            torch.save(batch[0].cpu(), self.folder / name)
        self.batches_per_epoch[-1] += 1


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
    record = {"batches_per_epoch": recorder.batches_per_epoch, "extracted_rows": extracted_rows}
    (folder / f"rank{recorder.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
