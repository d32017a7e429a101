"""Weight matrices too big to copy: products with W or W^2 in float64, block by block.

The propagation multiplies second moments by the layer's squared weights, W^2, in float64
(:func:`~gradaudit.propagation.ops.dense.dense_stats`; the backward's
:class:`~gradaudit.propagation.channels.Mat`). A Linear layer of a 70B-parameter model
holds up to 235M weights: that square takes 1.9 GB, and the 80 decoder layers of such a
model 514 GiB. From :data:`CHUNKED_ABOVE` weights on, the handler keeps the weight
itself (which a meta model's stand-in shares between identical blocks,
:mod:`gradaudit.frontends.meta`) and forms each product from blocks of rows converted to
float64 when it is needed: the same sums, in the same precision, without the copy.
"""

from __future__ import annotations

from typing import Iterator

import torch

#: Weights with at least this many elements (4M: 32 MB in float64) are never copied.
CHUNKED_ABOVE = 1 << 22
#: Elements per block of rows (32 MB in float64).
BLOCK = 1 << 22


class Chunked:
    """The (C_out, C_in) matrix W or W^2 (``squared``) of ``weight`` in float64, or its
    transpose, supporting what the propagation does with such a matrix: ``@`` a vector
    or a matrix of columns, ``.t()``, ``.shape``, ``.dtype`` and ``.double()`` (which
    does build the whole matrix: for the rare paths that need it)."""

    dtype = torch.float64

    def __init__(self, weight: torch.Tensor, squared: bool, transposed: bool = False) -> None:
        self.weight, self.squared, self.transposed = weight.detach(), squared, transposed

    @property
    def shape(self) -> torch.Size:
        rows, cols = self.weight.shape
        return torch.Size((cols, rows) if self.transposed else (rows, cols))

    def t(self) -> "Chunked":
        return Chunked(self.weight, self.squared, not self.transposed)

    def _blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        step = max(1, BLOCK // max(self.weight.shape[1], 1))
        for start in range(0, self.weight.shape[0], step):
            block = self.weight[start : start + step].double()
            yield start, block * block if self.squared else block

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        other = other.double()
        if not self.transposed:
            return torch.cat([block @ other for _, block in self._blocks()])
        total = None
        for start, block in self._blocks():
            part = block.t() @ other[start : start + block.shape[0]]
            total = part if total is None else total + part
        return total

    def double(self) -> torch.Tensor:
        w = self.weight.double()
        w = w * w if self.squared else w
        return w.t() if self.transposed else w

    def to(self, dtype: torch.dtype) -> "Chunked | torch.Tensor":
        return self if dtype == torch.float64 else self.double().to(dtype)


def column_moments(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, mean square) of each column of a 2-d weight over its rows, in float64,
    from blocks of rows (an embedding table's 262M weights stay uncopied)."""
    w = weight.detach()
    total, squares = torch.zeros(w.shape[1], dtype=torch.float64), torch.zeros(w.shape[1], dtype=torch.float64)
    step = max(1, BLOCK // max(w.shape[1], 1))
    for start in range(0, w.shape[0], step):
        block = w[start : start + step].double()
        total += block.sum(0)
        squares += (block * block).sum(0)
    return total / w.shape[0], squares / w.shape[0]


def weights(weight: torch.Tensor) -> tuple[torch.Tensor | Chunked, torch.Tensor | Chunked]:
    """(W, W^2) in float64: tensors, or :class:`Chunked` from :data:`CHUNKED_ABOVE` weights on."""
    if weight.numel() >= CHUNKED_ABOVE:
        return Chunked(weight, False), Chunked(weight, True)
    w = weight.detach().double()
    return w, w * w
