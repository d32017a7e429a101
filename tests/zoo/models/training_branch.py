"""A model whose forward branches on ``self.training`` (noise injection while training)."""

import torch
import torch.nn as nn


class NoisyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.training:
            h = h + 0.1 * torch.randn_like(h)
        h = torch.relu(self.fc2(h))
        return self.fc3(h)


model = NoisyMLP()
example_inputs = (torch.randn(16, 32, generator=torch.Generator().manual_seed(0)),)
