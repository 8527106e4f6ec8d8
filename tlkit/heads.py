"""The new classifier head: dropout, an optional hidden layer, a linear classifier.

Initialisation is deliberate (the lecture's lesson): the hidden layer gets He initialisation
(randn / sqrt(fan_in / 2)), which keeps the activation scale through a ReLU, and the classifier
gets small gaussian weights (0.01 * randn) and zero bias, so the logits start near zero, every
class is equally likely and the loss at initialisation is ln(C). `recipes/init_statistics.py`
shows why, on the lecture's 10-layer MLP; `tlkit sanity` checks it on the real model.
"""

from __future__ import annotations

from torch import nn

CLASSIFIER_INIT_STD = 0.01


class ClassifierHead(nn.Module):
    """Dropout -> [Linear -> ReLU -> Dropout] -> Linear, mapping pooled features to logits."""

    def __init__(
        self, in_features: int, num_classes: int, dropout: float = 0.5, hidden: int = 0
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
        nn.init.normal_(classifier.weight, std=CLASSIFIER_INIT_STD)
        nn.init.zeros_(classifier.bias)
        self.layers = nn.Sequential(*layers, classifier)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer, producing the logits."""
        return self.layers[-1]

    def forward(self, features):
        return self.layers(features)
