"""benchmarks/overhead.py compares like with like: its plain PyTorch loop takes exactly the
training steps that `tlkit finetune` takes (same data order, model, optimiser and schedule)."""

import runpy
from pathlib import Path

import torch
from conftest import TINY_CONFIG

from tlkit import FinetuneConfig
from tlkit.runfolder import DataFacts
from tlkit.train.build import build_model

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def test_plain_loop_takes_the_same_steps_as_tlkit(colour_folder: Path, tmp_path: Path):
    overhead = runpy.run_path(str(BENCHMARK))
    options = {
        **TINY_CONFIG,
        "data_dir": str(colour_folder),
        "strategy": "partial",
        "unfreeze_stages": 1,
        "lr": 3e-3,
        "epochs": 1,
        "channels_last": True,
    }
    steps = 2  # 21 training images: two full batches of 8
    plain_config = FinetuneConfig(out=str(tmp_path / "plain"), **options)
    tlkit_config = FinetuneConfig(out=str(tmp_path / "tlkit"), **options)

    initial = {
        name: value.clone()
        for name, value in build_model(plain_config, DataFacts(["a", "b", "c"]))
        .state_dict()
        .items()
    }
    _, plain_ends, plain_model = overhead["plain_pytorch_loop"](plain_config, steps)
    _, tlkit_ends = overhead["tlkit_training_steps"](
        tlkit_config, steps, num_sanity_val_steps=0, enable_progress_bar=False
    )

    assert len(plain_ends) == len(tlkit_ends) == steps
    trained = torch.load(tmp_path / "tlkit" / "last.ckpt", weights_only=True)["state_dict"]
    plain_state = plain_model.state_dict()
    assert set(plain_state) == set(trained)
    for name, value in plain_state.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=1e-6, msg=name)
    last_stage = "backbone.conv_head.weight"  # trained by both sides: the steps did something
    assert not torch.equal(plain_state[last_stage], initial[last_stage])
