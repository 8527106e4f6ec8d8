"""The names and defaults the command line offers, free of heavy imports, so that building the
parser (and `tlkit --help`) loads no torch. The modules that implement them take them from here:
tta.py (presets), export.py (formats, a test keeps its table's keys equal) and sanity.py."""

TTA_PRESETS = ("none", "flip", "ten-crop", "multi-scale", "dense")
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")
SANITY_SAMPLES_PER_CLASS = 20
SANITY_OVERFIT_STEPS = 300
