"""The model: a pretrained timm backbone, a new head and what trains (uses `tlkit.data`).

- `backbones`: timm backbones, their weights (hub, bundled, file, none), preprocessing and
  layer groups.
- `heads`: the new classifier head and its deliberate initialisation.
- `strategies`: what each transfer strategy trains, and the optimiser's parameter groups.
- `tasks`: single- and multi-label (`TASKS`): loss, activation, metrics, monitored metric,
  prediction row, the exported network's last layer.
- `classifier`: `TransferClassifier`, the LightningModule: loss, metrics, optimiser, schedule.
"""
