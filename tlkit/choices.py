"""The names and defaults the command line offers, free of heavy imports, so that building the
parser (and `tlkit --help`) loads no torch. The modules that implement them take them from here:
tta.py (presets), export.py (formats), search.py (samplers), data.py (scan verify modes),
sanity.py and shards.py; tests keep each module's table keys equal to these names."""

VERIFY_MODES = ("full", "header", "none")
TTA_PRESETS = ("none", "flip", "ten-crop", "multi-scale", "dense")
TTA_AUTO = "auto"  # not a preset: the one a run chose on its validation split (--tta auto)
TTA_CHOICES = (*TTA_PRESETS, TTA_AUTO)
# At most this many images (a seeded sample of the validation split) measure --tta auto's choice:
# a bounded cost (at most 32 forward passes per image for the four candidates, each view once:
# tta.measuring_plans), and still a gain of 1.2 points told from noise where two presets
# disagree on 5% of the images (tta.AUTO_MIN_Z).
TTA_CHOICE_MAX_IMAGES = 1000
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")
SEARCH_SAMPLERS = ("random", "tpe")
SANITY_SAMPLES_PER_CLASS = 20
SANITY_OVERFIT_STEPS = 300
SHARD_CHUNK_BYTES = "64MB"  # tlkit convert: LitData's own default chunk size
