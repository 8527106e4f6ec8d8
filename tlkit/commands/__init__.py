"""Commands built on the layers below, one module each (`cli.py` parses their flags).

- `report`: the HTML report of a run.
- `sanity`: the checks before training (loss at init, overfit a subset, activations, gradients).
- `search`: random hyperparameter search with Optuna.
- `demo`: the embedded default: texture patches, a classic baseline, then transfer learning.
"""
