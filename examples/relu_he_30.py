"""The 30-layer ReLU MLP of ``relu_xavier_30.py`` with He (Kaiming normal) init.

What it shows: He init, Var[w] = 2 / fan_in, exactly compensates ReLU's halving of the
second moment (He et al., ICCV 2015), so the activation scale and the gradient stay of
order 1 through all 30 layers (per-layer gain chi_1 = s_w^2 / 2 = 1: the critical
point of Schoenholz et al. 2017).
"""

import torch
import torch.nn as nn

DEPTH = 30
WIDTH = 256


def build() -> nn.Sequential:
    layers = []
    for _ in range(DEPTH - 1):
        layer = nn.Linear(WIDTH, WIDTH)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.ReLU()]
    head = nn.Linear(WIDTH, 10)
    nn.init.kaiming_normal_(head.weight, nonlinearity="relu")
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


torch.manual_seed(0)
model = build()
example_inputs = (torch.randn(64, WIDTH),)
