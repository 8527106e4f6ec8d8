"""Using a trained model: evaluate, predict, test-time averaging and export (uses `tlkit.model`).

- `predict`: evaluate and predict with a run folder's checkpoint or an exported model.
- `tta`: test-time averaging of several views per image.
- `export`: TorchScript, ONNX and safetensors files with a card, verified against the run.
"""
