"""The small fixed model of the gold-file tests: 20 sigmoid layers, width 16, N(0, 1)
weights. Gradients vanish (Glorot & Bengio 2010), so the reports carry a finding with
a source line, a fix and numbers."""

import torch
import torch.nn as nn


class TinySigmoid(nn.Module):
    def __init__(self, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.head = nn.Linear(width, 1)
        for layer in [self.stem, *self.blocks]:
            nn.init.normal_(layer.weight, std=1.0)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        x = torch.sigmoid(self.stem(x))
        for block in self.blocks:
            x = torch.sigmoid(block(x))
        return self.head(x)


torch.manual_seed(0)
model = TinySigmoid()
example_inputs = (torch.randn(8, 16),)
