"""The lecture's initialisation experiment: activations through a 10-layer MLP.

    python recipes/init_statistics.py --out runs/init_statistics.png

Unit-gaussian input (1000 samples x 500 features) goes through 10 layers of 500 units, without
biases, with tanh or ReLU, the weights drawn four ways:

- small: 0.01 * randn. The activations shrink at every layer and collapse to zero (vanishing).
- large: randn. tanh units are pushed to +-1 (saturated; their local gradient is zero).
- Xavier: randn / sqrt(fan_in). Keeps the scale through tanh (derived for linear units); with
  ReLU, which zeroes half of its input, the std halves in variance at every layer.
- He: randn / sqrt(fan_in / 2). Makes up for the halving: keeps the scale through ReLU.

Each layer's output mean and std are printed as in the lecture, with tlkit's vanishing and
saturating flags (the same hooks and rules as `tlkit sanity`), and one PNG shows every layer's
distribution. tlkit's own head follows this: its hidden layer (ReLU) gets He initialisation, and
the final linear layer, which feeds a softmax rather than a nonlinearity to be kept in range,
starts at zero (BiT's head) so the loss at initialisation is exactly ln(C).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from tlkit.commands.sanity import LayerStatistics, describe, layer_statistics, record_outputs

LAYERS = 10
WIDTH = 500
SAMPLES = 1000
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
INITIALISATIONS: dict[str, Callable[[torch.Tensor], object]] = {
    "small": lambda weight: nn.init.normal_(weight, std=0.01),  # 0.01 * randn
    "large": lambda weight: nn.init.normal_(weight, std=1.0),  # randn
    # randn / sqrt(fan_in); nn.Linear's weight is (fan_out, fan_in)
    "xavier": lambda weight: nn.init.normal_(weight, std=1 / math.sqrt(weight.shape[1])),
    # randn / sqrt(fan_in / 2)
    "he": lambda weight: nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu"),
}


def build_mlp(activation: str, initialisation: str, seed: int = 0) -> nn.Sequential:
    """LAYERS x (Linear(WIDTH, WIDTH, bias=False) -> activation), initialised as named."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        linear = nn.Linear(WIDTH, WIDTH, bias=False)
        INITIALISATIONS[initialisation](linear.weight)
        layers += [linear, ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


def layer_outputs(
    activation: str, initialisation: str, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unit-gaussian input and the output of every hidden layer (after its activation)."""
    mlp = build_mlp(activation, initialisation, seed)
    inputs = torch.randn(SAMPLES, WIDTH, generator=torch.Generator().manual_seed(seed + 1))
    modules = {f"layer {i // 2 + 1}": mlp[i] for i in range(1, len(mlp), 2)}
    with torch.no_grad(), record_outputs(modules) as outputs:
        mlp(inputs)
    return inputs, [outputs[name] for name in modules]


def statistics(
    inputs: torch.Tensor, outputs: list[torch.Tensor]
) -> tuple[LayerStatistics, list[LayerStatistics]]:
    """Mean and std of the input, and of each hidden layer with vanishing/saturating flags."""
    input_std = inputs.std().item()
    layers = [
        layer_statistics(f"layer {index}", output, input_std)
        for index, output in enumerate(outputs, start=1)
    ]
    return layer_statistics("input", inputs, input_std, flag=False), layers


def plot(path: Path, outputs: dict[tuple[str, str], list[torch.Tensor]]) -> None:
    """One row per (activation, initialisation), one histogram per layer."""
    figure = Figure(figsize=(2 * LAYERS, 1.8 * len(outputs)), layout="tight")
    axes = figure.subplots(len(outputs), LAYERS, squeeze=False)
    for row, ((activation, initialisation), layers) in enumerate(outputs.items()):
        for column, output in enumerate(layers):
            values = output.flatten().numpy()
            counts, edges = np.histogram(values, bins=50)
            axis = axes[row][column]
            axis.stairs(counts, edges, fill=True, color="tab:blue")
            axis.set_yticks([])
            axis.tick_params(labelsize=6)
            axis.set_title(f"layer {column + 1}: std {values.std():.2g}", fontsize=7)
        axes[row][0].set_ylabel(f"{activation}\n{initialisation}", fontsize=9)
    figure.suptitle(f"Activations of a {LAYERS}-layer MLP ({WIDTH} units) on unit-gaussian input")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/init_statistics.png", help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    all_outputs = {}
    for activation in ACTIVATIONS:
        for initialisation in INITIALISATIONS:
            inputs, outputs = layer_outputs(activation, initialisation, arguments.seed)
            all_outputs[activation, initialisation] = outputs
            input_statistics, layers = statistics(inputs, outputs)
            print(f"\n{activation}, {initialisation} initialisation")
            print(describe("input layer", input_statistics))
            for index, layer in enumerate(layers, start=1):
                print(describe(f"hidden layer {index}", layer))
    plot(Path(arguments.out), all_outputs)
    print(f"\nwrote {arguments.out}")


if __name__ == "__main__":
    main()
