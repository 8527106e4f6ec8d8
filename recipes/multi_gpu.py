"""Multi-GPU and multi-node fine-tuning: the same run, spread by Lightning's DDP.

One machine, all its GPUs (Lightning starts one process per GPU itself):

    python recipes/multi_gpu.py DATA_DIR --devices 4

Several machines: start this script on every node with torchrun (or `srun` under SLURM, see
docs/multi-gpu.md); Lightning reads the rank and world size from the launcher's environment:

    torchrun --nnodes 2 --nproc-per-node 4 --node-rank $RANK --master-addr $HOST \
        --master-port 29500 recipes/multi_gpu.py DATA_DIR --devices 4 --num-nodes 2

`--batch-size` is per device: the effective batch is batch x devices x nodes, and with
`--scale-lr` the learning rate grows with it (the linear scaling rule). BatchNorm statistics are
synchronised across processes (timm's SyncBatchNorm conversion, activations kept) and the
backbone runs in bf16 mixed precision with channels-last tensors on GPUs.
"""

from __future__ import annotations

import argparse

import torch

from tlkit import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--out", default="runs/multi-gpu")
    parser.add_argument("--devices", default="auto", help="GPUs per node, or 'auto' for all")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--pretrained", default="bundled")
    parser.add_argument("--strategy", default="full", choices=["features", "partial", "full"])
    parser.add_argument("--batch-size", type=int, default=64, help="per device")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=1e-3, help="for one device's batch")
    arguments = parser.parse_args()

    on_gpus = torch.cuda.is_available()
    config = FinetuneConfig(
        data_dir=arguments.data_dir,
        out=arguments.out,
        pretrained=arguments.pretrained,
        strategy=arguments.strategy,
        epochs=arguments.epochs,
        img_size=arguments.img_size,
        batch_size=arguments.batch_size,
        lr=arguments.lr,
        scale_lr=True,
        accelerator="gpu" if on_gpus else "cpu",
        devices=arguments.devices if on_gpus else "2",
        num_nodes=arguments.num_nodes,
        dist_strategy="ddp",
        sync_batchnorm=True,
        precision="bf16-mixed" if on_gpus else "32",
        channels_last=on_gpus,
    )
    summary = finetune(config)  # every process returns the same, synchronised summary
    print(f"test accuracy {summary.test_acc}; run folder {arguments.out}")


if __name__ == "__main__":
    main()
