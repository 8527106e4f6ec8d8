"""Data: where the images come from and how they reach the model (the lowest layer).

- `images`: decoding any image file to 8-bit RGB, robustly (`load_rgb`), and checking files.
- `sources`: class-folder trees and `path,label` (or multi-label `path,labels`) CSVs, listed
  and checked (`scan`).
- `labels`: the label kinds (one class per image, or several): reading, counting, batching.
- `scan_index`: what the scan learnt about each file, cached so that it is learnt once.
- `split`: the stable train/validation split.
- `augment`: the backbone's preprocessing as albumentations pipelines, for training and evaluation.
- `datasets`: decoded, transformed images (`ImageDataset`) and the per-process samplers
  (shuffled, or class-balanced: `TRAINING_SAMPLERS`).
- `datamodule`: the LightningDataModule of a folder or CSV (`ImageDataModule`).
- `shards`: datasets converted to LitData shards (`tlkit convert`) and their data module.
"""
