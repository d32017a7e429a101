"""A small Pre-LN transformer encoder (Xiong et al., ICML 2020).

What it shows: with LayerNorm at the *start* of each residual branch, the residual
stream carries the gradient straight through every block, so the per-layer gradient is
nearly flat from the output back to the embedding (compare Post-LN, where LayerNorm
after each sum rescales it block by block). Six blocks, d_model 64, 4 heads,
feed-forward 256 with GELU, token embedding, final LayerNorm and a linear head over a
1000-word vocabulary; input: 4 sequences of 32 token ids.
"""

import torch
import torch.nn as nn

VOCAB, D_MODEL, HEADS, BLOCKS, SEQ = 1000, 64, 4, 6, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.ff1 = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff2(self.act(self.ff1(self.ln2(x))))


class PreLNEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


torch.manual_seed(0)
model = PreLNEncoder()
example_inputs = (torch.randint(0, VOCAB, (4, SEQ)),)
