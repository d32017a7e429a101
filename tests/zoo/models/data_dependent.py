"""A model whose forward branches on its data: ``if x.sum() > 0``."""

import torch
import torch.nn as nn


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if x.sum() > 0:
            h = torch.tanh(self.fc2(h))
        else:
            h = torch.relu(self.fc2(h))
        return self.fc3(h)


model = Gated()
example_inputs = (torch.randn(16, 32, generator=torch.Generator().manual_seed(0)),)
