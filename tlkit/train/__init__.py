"""Training: a config -> a run folder (uses `tlkit.infer`, `tlkit.model`, `tlkit.data`).

- `build`: a config -> its data module and model, and the checks that need no data.
- `finetune`: the orchestrator: resume, decide, build, fit, test, summarise.
- `auto`: `--strategy auto`: measure the data cheaply, then choose (pure decision rules).
- `budget`: `--budget`: this device's measured throughput -> epochs and epoch length.
- `probe`: the linear probe and k-NN classifier on cached features (auto's evidence, LP-FT).
- `soup`: `--soup K`: the greedy soup of the K best checkpoints, written into best.ckpt.
- `features`: the cached-feature path of the frozen backbone.
- `callbacks`: Lightning callbacks: progress bar, epoch summary, divergence stop, EMA.
- `hardware`: devices, precision and distribution (Lightning's DDP and FSDP).
- `device_settings`: precision and memory layout on one GPU, timed at the run's size.
"""
