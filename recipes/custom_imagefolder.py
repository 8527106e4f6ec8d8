"""Fine-tune on your own image folder with the Python API and a Lightning Trainer you configure.

    python recipes/custom_imagefolder.py DATA_DIR [--pretrained bundled] [--epochs 10]

DATA_DIR holds one sub-folder per class (or train/, val/, test/ splits of those). This is the
same path `tlkit finetune` takes, written out so each piece can be swapped: the data module, the
LightningModule and the Trainer (add callbacks, loggers, precision, devices as you like).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from tlkit import ImageDataModule, TransferClassifier, preprocessing
from tlkit.metrics import logged_name
from tlkit.model.tasks import resolve_monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", default="bundled", help="hub, bundled, none or a file")
    parser.add_argument("--strategy", default="partial", choices=["features", "partial", "full"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="runs/custom")
    arguments = parser.parse_args()

    pl.seed_everything(0, workers=True)
    data = ImageDataModule(
        arguments.data_dir, preprocessing(arguments.backbone, arguments.img_size), batch_size=32
    )
    data.setup("fit")  # scans the folder: class names, skipped files
    facts = data.data_facts(trained_with_hflip=True)  # the default augmentation flips
    print(
        f"{len(facts.classes)} classes, {facts.split_images['train']} training images, "
        f"{len(data.skipped)} files skipped"
    )

    model = TransferClassifier(
        num_classes=len(facts.classes),
        class_names=facts.classes,
        task=facts.label_kind,
        backbone=arguments.backbone,
        pretrained=arguments.pretrained,
        strategy=arguments.strategy,
        img_size=arguments.img_size,
    )
    print(f"trainable parameters: {model.trainable_parameters():,}")

    # the validation metric tlkit would watch for this data (balanced accuracy if imbalanced)
    monitor = logged_name("val", resolve_monitor(facts.label_kind, "auto", facts.class_ratio).value)
    checkpoint = ModelCheckpoint(
        dirpath=arguments.out, filename="best", monitor=monitor, mode="max", save_last=True
    )
    trainer = pl.Trainer(
        max_epochs=arguments.epochs,
        default_root_dir=arguments.out,
        callbacks=[checkpoint, EarlyStopping(monitor=monitor, mode="max", patience=3)],
    )
    trainer.fit(model, datamodule=data)
    if data.test_set is not None:
        trainer.test(model, datamodule=data, ckpt_path="best")


if __name__ == "__main__":
    main()
