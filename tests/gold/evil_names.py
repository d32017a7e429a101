"""A saturating sigmoid stack whose first layer is named like an HTML injection.

The report must show the name as text: every renderer escapes module names.
"""

import torch
import torch.nn as nn

EVIL = "<img src=x onerror=alert(1)>"


class Evil(nn.Module):
    def __init__(self, depth=24, width=16):
        super().__init__()
        self.add_module(EVIL, nn.Linear(width, width))
        nn.init.normal_(getattr(self, EVIL).weight, std=1.0)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            layer = nn.Linear(width, width)
            nn.init.normal_(layer.weight, std=1.0)
            self.blocks.append(layer)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        x = torch.sigmoid(getattr(self, EVIL)(x))
        for block in self.blocks:
            x = torch.sigmoid(block(x))
        return self.head(x)


torch.manual_seed(0)
model = Evil()
example_inputs = (torch.randn(8, 16),)
