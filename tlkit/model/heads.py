"""The new classifier head: dropout, an optional hidden layer, a linear classifier.

Initialisation is deliberate (the lecture's lesson), chosen by what follows each layer:

- the hidden layer feeds a ReLU and gets He initialisation (randn / sqrt(fan_in / 2)), which
  keeps the activation scale through it;
- the classifier feeds the softmax, where the goal is equal probabilities, not a kept scale. It
  starts at zero weights and zero bias, as BiT's head does (Kolesnikov et al. 2020): every logit
  is 0, so the loss at initialisation is exactly ln(C) whatever the backbone. (Multi-label
  sigmoids start at each label's training rate instead: the bias is the task's
  `initial_bias`, the weights zero.) A "small" gaussian
  is not small enough: pooled features of a pretrained backbone have a large norm (about 60 for
  EfficientNet-Lite0's 1,280 on Fashion-MNIST), so 0.01 * randn gives logits of std 0.6 and a
  loss of 2.67 against ln 10 = 2.30. Zero weights do not stall learning: the classifier's own
  gradient (features x (softmax - one-hot)) is non-zero, and the layers below get theirs from
  the second step on.

`recipes/init_statistics.py` shows the hidden-layer choice on the lecture's 10-layer MLP;
`tlkit sanity` checks the loss at initialisation on the real model and data.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Dropout -> [Linear -> ReLU -> Dropout] -> Linear, mapping pooled features to logits;
    `bias`: the classifier's initial bias (default zero)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        dropout: float = 0.5,
        hidden: int = 0,
        bias: list[float] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden > 0:
            hidden_layer = nn.Linear(in_features, hidden)
            nn.init.kaiming_normal_(hidden_layer.weight, nonlinearity="relu")
            nn.init.zeros_(hidden_layer.bias)
            layers += [hidden_layer, nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = hidden
        classifier = nn.Linear(in_features, num_classes)
        nn.init.zeros_(classifier.weight)
        nn.init.zeros_(classifier.bias)
        if bias is not None:  # the constant prediction to start from (tasks' `initial_bias`)
            with torch.no_grad():
                classifier.bias.copy_(torch.tensor(bias, dtype=classifier.bias.dtype))
        self.layers = nn.Sequential(*layers, classifier)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer, producing the logits."""
        return self.layers[-1]

    def forward(self, features):
        return self.layers(features)
