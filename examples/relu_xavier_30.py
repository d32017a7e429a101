"""A 30-layer ReLU MLP (width 256) with Xavier (Glorot) init and zero bias.

What it shows: Xavier's n Var[w] = 1 is right for tanh or linear layers, but ReLU
zeroes half of its input, so every layer halves the forward second moment (He et al.,
ICCV 2015): after 30 layers the activation variance has fallen by about 2^-29 ~ 2e-9
and the network stalls (He et al.'s 30-layer net did not train with Xavier init).
Compare ``relu_he_30.py``.
"""

import torch
import torch.nn as nn

DEPTH = 30
WIDTH = 256


def build(init) -> nn.Sequential:
    layers = []
    for _ in range(DEPTH - 1):
        layer = nn.Linear(WIDTH, WIDTH)
        init(layer.weight)
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.ReLU()]
    head = nn.Linear(WIDTH, 10)
    init(head.weight)
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


torch.manual_seed(0)
model = build(nn.init.xavier_normal_)
example_inputs = (torch.randn(64, WIDTH),)
