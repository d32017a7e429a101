"""Weight matrices too big to copy: products with W or W^2 in float64, block by block.

The propagation multiplies second moments by the layer's squared weights, W^2, in float64
(:func:`~gradaudit.propagation.ops.dense.dense_stats`; the backward's
:class:`~gradaudit.propagation.channels.Mat`). A Linear layer of a 70B-parameter model
holds up to 235M weights: that square takes 1.9 GB, and the 80 decoder layers of such a
model 514 GiB. From :data:`CHUNKED_ABOVE` weights on, the handler keeps the weight
itself (which a meta model's stand-in shares between identical blocks,
:mod:`gradaudit.frontends.meta`) and forms each product from blocks of rows converted to
float64 when it is needed: the same sums, in the same precision, without the copy.

The blocks are small (:data:`BLOCK`: 2 MB in float64, so a block stays in the CPU's
cache between its conversion, its square and its product) and converted into one
buffer reused from block to block: a fresh 32 MB block per step spent most of its time
faulting pages in (8.5 ns per weight against 0.6 ns, measured on a 7168 x 2048 weight).

A pass splits the rows into :data:`STRIPES` stripes of whole blocks, run on the
audit's threads (:func:`gradaudit.serial.each`): rows of a product are written where
they belong, and a sum over rows (a column sum, a transposed product) is summed per
stripe, then over the stripes in their order. The stripes are the same whatever the
number of threads, so the sums are the same bits.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterator, TypeVar

import torch

from gradaudit import serial

R = TypeVar("R")

#: Weights with at least this many elements (4M: 32 MB in float64) are never copied.
CHUNKED_ABOVE = 1 << 22
#: Elements per block of rows (2 MB in float64: it stays in cache).
BLOCK = 1 << 18
#: Stripes of rows per pass (:func:`stripes`), whatever the number of threads.
STRIPES = 16


class Chunked:
    """The (C_out, C_in) matrix W or W^2 (``squared``) of ``weight`` in float64, or its
    transpose, supporting what the propagation does with such a matrix: ``@`` a vector
    or a matrix of columns, ``.t()``, ``.shape``, ``.dtype`` and ``.double()`` (which
    does build the whole matrix: for the rare paths that need it)."""

    dtype = torch.float64

    def __init__(self, weight: torch.Tensor, squared: bool, transposed: bool = False, reuse: "Reuse | None" = None) -> None:
        self.weight = weight.detach() if weight.requires_grad else weight  # views share it: see :func:`pair`
        self.squared, self.transposed = squared, transposed
        self.reuse = reuse  # the run's earlier products of this weight (:class:`Reuse`), if kept

    @property
    def shape(self) -> torch.Size:
        rows, cols = self.weight.shape
        return torch.Size((cols, rows) if self.transposed else (rows, cols))

    def t(self) -> "Chunked":
        return Chunked(self.weight, self.squared, not self.transposed, self.reuse)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        other = other.double()
        if self.reuse is not None and self.squared and self.transposed:  # the backward of a variance
            found = self.reuse.backward(other)
            if found is None:
                found = self._exact(other)
                self.reuse.learn_backward(other, found)
            return found
        return self._exact(other)

    def _exact(self, other: torch.Tensor) -> torch.Tensor:
        rows, cols = self.weight.shape
        if not self.transposed:
            out = torch.empty((rows, *other.shape[1:]), dtype=torch.float64)

            def rows_of(blocks: Iterator[tuple[int, torch.Tensor]]) -> None:
                for start, block in blocks:
                    torch.matmul(block, other, out=out[start : start + block.shape[0]])

            each_stripe(self.weight, rows_of, self.squared)
            return out
        # (other^T W)^T accumulated in place, row-major: the blocks stay contiguous for BLAS
        columns = other.reshape(rows, -1)

        def partial(blocks: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
            total = torch.zeros((columns.shape[1], cols), dtype=torch.float64)
            for start, block in blocks:
                total.addmm_(columns[start : start + block.shape[0]].t(), block)
            return total

        total = in_order(each_stripe(self.weight, partial, self.squared))
        return total[0] if other.dim() == 1 else total.t()

    def double(self) -> torch.Tensor:
        w = self.weight.double()
        w = w * w if self.squared else w
        return w.t() if self.transposed else w

    def to(self, dtype: torch.dtype) -> "Chunked | torch.Tensor":
        return self if dtype == torch.float64 else self.double().to(dtype)


def pair(plain: "Chunked | torch.Tensor", squared: "Chunked | torch.Tensor") -> bool:
    """Whether ``plain`` and ``squared`` are the W and W^2 views of one chunked weight
    (then :func:`products` forms both products in one pass over it)."""
    return (isinstance(plain, Chunked) and isinstance(squared, Chunked) and plain.weight is squared.weight
            and not plain.squared and squared.squared and not plain.transposed and not squared.transposed)


def products(weight: torch.Tensor, vector: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W @ vector, W^2 @ columns) in float64 from one pass over the blocks of W."""
    vector, columns = vector.double(), columns.double()
    plain = torch.empty(weight.shape[0], dtype=torch.float64)
    squared = torch.empty((weight.shape[0], *columns.shape[1:]), dtype=torch.float64)

    def rows_of(blocks: Iterator[tuple[int, torch.Tensor]]) -> None:
        for start, block in blocks:
            stop = start + block.shape[0]
            torch.matmul(block, vector, out=plain[start:stop])
            torch.matmul(block.mul_(block), columns, out=squared[start:stop])

    each_stripe(weight, rows_of)
    return plain, squared


def reused_products(plain: Chunked, vector: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`products` of a chunked weight, from the run's earlier products of it when
    :class:`Reuse` bounds their error (``plain.reuse``; else one pass, then kept)."""
    reuse = plain.reuse
    if reuse is not None and reuse._sums is None:  # its first product: one pass for both
        return reuse.first(vector, columns)
    found = reuse.forward(vector, columns) if reuse is not None else None
    if found is None:
        found = products(plain.weight, vector, columns)
        if reuse is not None:
            reuse.learn_forward(vector, columns, *found)
    return found


def _rows_per_block(weight: torch.Tensor) -> int:
    return max(1, BLOCK // max(weight.shape[1], 1))


class _Buffer(threading.local):
    """Each thread's float64 buffer that its blocks are views of (grown when needed)."""

    tensor = torch.empty(0, dtype=torch.float64)


_buffer = _Buffer()


def row_blocks(weight: torch.Tensor, squared: bool = False, rows: tuple[int, int] | None = None
               ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float64 block of rows of the 2-d ``weight``, squared if asked) for
    consecutive blocks of about :data:`BLOCK` elements (of the rows ``rows`` = (first,
    stop), default all). Every block is a view of this thread's buffer, which the next
    step overwrites: use it before asking for the next."""
    w = weight.detach()
    step = _rows_per_block(w)
    first, stop = rows if rows is not None else (0, w.shape[0])
    size = min(step, stop - first) * w.shape[1]
    if _buffer.tensor.numel() < size:
        _buffer.tensor = torch.empty(size, dtype=torch.float64)
    buffer = _buffer.tensor[:size].view(-1, w.shape[1]) if size else _buffer.tensor[:0].view(0, w.shape[1])
    for start in range(first, stop, step):
        source = w[start : min(start + step, stop)]
        block = buffer[: source.shape[0]]
        block.copy_(source)
        if squared:
            block.mul_(block)
        yield start, block


def stripes(weight: torch.Tensor) -> list[tuple[int, int]]:
    """(first row, stop) of the :data:`STRIPES` stripes of whole blocks of rows (fewer
    when the weight has fewer blocks)."""
    rows, step = weight.shape[0], _rows_per_block(weight)
    if rows == 0:
        return [(0, 0)]
    per = step * math.ceil(math.ceil(rows / step) / STRIPES)
    return [(start, min(start + per, rows)) for start in range(0, rows, per)]


def each_stripe(weight: torch.Tensor, work: Callable[[Iterator[tuple[int, torch.Tensor]]], R], squared: bool = False
                ) -> list[R]:
    """``work(blocks)`` for the :func:`row_blocks` of each of the weight's :func:`stripes`,
    on the audit's threads (:func:`gradaudit.serial.each`); the results in stripe order."""
    return serial.each(lambda rows: work(row_blocks(weight, squared, rows)), stripes(weight))


def in_order(partials: list):
    """The sum of the stripes' partial sums, added in stripe order (the same bits on any
    number of threads)."""
    total = partials[0]
    for part in partials[1:]:
        total = total + part
    return total


def _column_sums(weight: torch.Tensor) -> torch.Tensor:
    """(2, C_in): the sums of each column of a 2-d weight and of its squares, in float64,
    from blocks of rows."""

    def partial(blocks: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
        sums = torch.zeros((2, weight.shape[1]), dtype=torch.float64)
        for _, block in blocks:
            sums[0] += block.sum(0)
            sums[1] += block.mul_(block).sum(0)
        return sums

    return in_order(each_stripe(weight, partial))


def column_moments(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, mean square) of each column of a 2-d weight over its rows, in float64,
    from blocks of rows (an embedding table's 262M weights stay uncopied)."""
    total, squares = _column_sums(weight)
    return total / weight.shape[0], squares / weight.shape[0]


def in_memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """The same entries as ``tensor``, its dimensions permuted to the order they lie in
    memory (largest stride first) when that makes it contiguous: a transposed or
    permuted view of a weight (a mixture of experts' (E, in, out) view of its (E, out,
    in) parameter) then flattens without a copy. Else ``tensor`` itself."""
    if tensor.is_contiguous() or tensor.dim() < 2:
        return tensor
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))
    permuted = tensor.permute(order)
    return permuted if permuted.is_contiguous() else tensor


def moments(tensor: torch.Tensor) -> tuple[float, float] | None:
    """(mean, mean square) of all entries in float64, or None when one is not finite,
    from blocks (a 235M-weight Linear is never copied whole; nor a permuted view of a
    weight, read in memory order: :func:`in_memory_order`)."""
    tensor = in_memory_order(tensor.detach())
    total, squares = _column_sums(tensor.reshape(-1, 1) if tensor.dim() != 2 else tensor).sum(1).tolist()
    if not (math.isfinite(total) and math.isfinite(squares)):
        return None
    n = max(tensor.numel(), 1)
    return total / n, squares / n


def weights(weight: torch.Tensor, reuse: "Callable[[torch.Tensor], Reuse | None] | None" = None
            ) -> tuple[torch.Tensor | Chunked, torch.Tensor | Chunked]:
    """(W, W^2) in float64: tensors, or :class:`Chunked` from :data:`CHUNKED_ABOVE` weights on
    (with the run's :class:`Reuse` of the tensor, when ``reuse`` gives one)."""
    if weight.numel() >= CHUNKED_ABOVE:
        weight = weight.detach()  # one tensor for both views (see :func:`pair`)
        kept = reuse(weight) if reuse is not None and weight.dim() == 2 else None
        return Chunked(weight, False, reuse=kept), Chunked(weight, True, reuse=kept)
    w = weight.detach().double()
    return w, w * w


#: Largest relative error, per output channel, of a product that :class:`Reuse` forms from
#: the products of earlier inputs instead of a pass over the weight (see there).
TOLERANCE = 1e-3
#: Most inputs whose exact products :class:`Reuse` keeps, per weight and per product.
BASIS = 32
#: An input is kept only when at least this fraction of its norm lies outside the span
#: of those already kept (its product is then known to about 1e-16 / KEEP_ABOVE relative).
KEEP_ABOVE = 1e-6


#: A reused forward product whose bound fails on at most this fraction of the output
#: channels gets those channels' rows exactly; on more, a pass over the weight.
FIX_ROWS_BELOW = 0.25


class _Span:
    """Inputs x_k of one linear map A (n -> m) with their exact products A x_k, as an
    orthonormal basis Q (n x k) and P = A Q (m x k); the first vector is 1 / sqrt(n),
    whose product the caller gives (A's row sums)."""

    def __init__(self, ones_product: torch.Tensor, n: int) -> None:
        root = math.sqrt(n)
        self.q = torch.full((n, 1), 1.0 / root, dtype=torch.float64)
        self.p = (ones_product.double() / root).reshape(-1, 1)

    def fit(self, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """(A (x - r), ||r||, |sum r|) for x = Q alpha + r, r orthogonal to the span
        (1 among it: r sums to 0 up to rounding, which the bound takes in)."""
        alpha = self.q.t() @ x
        alpha = alpha + self.q.t() @ (x - self.q @ alpha)  # a second pass: r orthogonal to Q to rounding
        r = x - self.q @ alpha
        slack = 1e-14 * float(x.norm())  # the rounding of r itself
        return self.p @ alpha, float(r.norm()) + slack, abs(float(r.sum())) + slack

    def add(self, x: torch.Tensor, ax: torch.Tensor) -> None:
        """Keep x (with its exact product ``ax``) when enough of it is new."""
        if self.q.shape[1] >= BASIS:
            return
        norm = float(x.norm())
        for _ in range(2):
            alpha = self.q.t() @ x
            x, ax = x - self.q @ alpha, ax - self.p @ alpha
        left = float(x.norm())
        if norm == 0.0 or left <= KEEP_ABOVE * norm:
            return
        self.q = torch.cat([self.q, (x / left).reshape(-1, 1)], 1)
        self.p = torch.cat([self.p, (ax / left).reshape(-1, 1)], 1)


class Reuse:
    """The products of one weight W (C_out x C_in) that a run forms again and again (the
    80 decoder layers of a meta model's stand-in share one draw), without a pass over W
    when the products of earlier inputs determine the new one to within
    :data:`TOLERANCE` per output channel. Held per run and per distinct tensor
    (:meth:`gradaudit.propagation.engine.Engine.reuse`).

    Take the forward variance product y = A x with A = W^2 (entries a_ij >= 0). Earlier
    inputs x_1..x_k (with the vector 1) span an orthonormal Q whose products P = A Q are
    exact (each came from a pass over W). Split the new input x = Q alpha + r with r
    orthogonal to Q. Then

        (A x)_i = (P alpha)_i + sum_j a_ij r_j
                = (P alpha)_i + sum_j (a_ij - t_i) r_j + t_i sum_j r_j      (any t_i)

    and with t_i = mean_j a_ij (Cauchy-Schwarz on the centred row):

        |(A x)_i - (P alpha)_i| <= c_i ||r|| + |t_i| |sum_j r_j|,   c_i = ||a_i. - t_i||_2

    (sum_j r_j is 0 but for rounding: 1 is in the span). c_i and t_i depend on W only and
    come from one pass over it (:meth:`sums`). The approximation P alpha stands for an
    output channel when the bound is at most :data:`TOLERANCE` times it (for the
    variance; for a column of the coherent part, times the variance's value; for the
    backward, A^T with the centred columns of A, times the gradient power's value). The
    mean W mu is bounded the same way with the centred rows of W and accepted when its
    bound is at most TOLERANCE times the output's standard deviation: then the second
    moment var + mean^2 is within (2 + TOLERANCE) TOLERANCE of the exact one. Channels
    that fail get their exact rows (at most :data:`FIX_ROWS_BELOW` of them); beyond
    that the exact product runs (for a mean alone, a pass of W times one vector), and x
    joins the span (up to :data:`BASIS` inputs, when at least :data:`KEEP_ABOVE` of its
    norm is new: the stored product's rounding then stays near 1e-10 relative).
    Every channel of every product is thus exact or within TOLERANCE, as
    ``tests/test_chunked.py`` checks against the whole matrix on random instances.

    For a stack of identical blocks the inputs of one weight differ from layer to layer
    in a few directions (the same weights made them), so after a few exact passes the
    later layers cost O((C_in + C_out) k) each instead of a pass over C_out x C_in
    weights. An input with no pattern in common with the earlier ones (random
    variances) fails the bound and gets the exact product: nothing is assumed.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self._sums: dict[str, torch.Tensor] | None = None
        self._spans: dict[str, _Span] = {}
        self.exact = self.reused = self.fixed = self.mean_passes = 0

    def sums(self) -> dict[str, torch.Tensor]:
        """Row and column sums of W^2 with the norms of its centred rows and columns, and
        the row sums of W with the norms of its centred rows: one pass over W."""
        if self._sums is None:
            self._pass()
        return self._sums

    def first(self, vector: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's first products (W @ vector, W^2 @ columns), exact, with
        :meth:`sums` from the same pass: nothing earlier can stand for them (the span
        holds only the constant vector), and the sums are wanted at the next product."""
        found = self._pass(vector.double(), columns.double())
        self.learn_forward(vector, columns, *found)
        return found

    def _pass(self, vector: torch.Tensor | None = None, columns: torch.Tensor | None = None):
        """One pass over the blocks of W: the sums of :meth:`sums` and, given ``vector``
        and ``columns`` (float64), the products of :func:`products` from the same
        blocks, the same operations on the same values."""
        rows_, cols = self.weight.shape
        r, r4, rw = (torch.empty(rows_, dtype=torch.float64) for _ in range(3))
        if vector is not None:
            plain = torch.empty(rows_, dtype=torch.float64)
            squared = torch.empty((rows_, *columns.shape[1:]), dtype=torch.float64)

        def stripe(blocks: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
            sums = torch.zeros((2, cols), dtype=torch.float64)  # this stripe's parts of c and c4
            for start, block in blocks:
                stop = start + block.shape[0]
                torch.sum(block, 1, out=rw[start:stop])
                if vector is not None:
                    torch.matmul(block, vector, out=plain[start:stop])
                a = block.mul_(block)
                torch.sum(a, 1, out=r[start:stop])
                sums[0] += a.sum(0)
                if vector is not None:
                    torch.matmul(a, columns, out=squared[start:stop])
                a = a.mul_(a)
                torch.sum(a, 1, out=r4[start:stop])
                sums[1] += a.sum(0)
            return sums

        c, c4 = in_order(each_stripe(self.weight, stripe))

        def centred(s2: torch.Tensor, s1: torch.Tensor, n: int) -> torch.Tensor:
            # ||z - mean z||^2 = sum z^2 - (sum z)^2 / n, with room for its rounding
            return ((s2 - s1 * s1 / n).clamp_min(0.0) + 1e-9 * s2).sqrt()

        self._sums = {
            "row": r, "row_c": centred(r4, r, cols), "col": c, "col_c": centred(c4, c, rows_),
            "wrow": rw, "wrow_c": centred(r, rw, cols),
        }
        return (plain, squared) if vector is not None else None

    def _span(self, key: str) -> _Span:
        if key not in self._spans:
            s = self.sums()
            ones, n = {"fwd": (s["row"], self.weight.shape[1]), "bwd": (s["col"], self.weight.shape[0]),
                       "mean": (s["wrow"], self.weight.shape[1])}[key]
            self._spans[key] = _Span(ones, n)
        return self._spans[key]

    def _bounded(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(approximation, bound on its error) per output channel of the product of x."""
        s = self.sums()
        norm, total, n = {"fwd": ("row_c", "row", self.weight.shape[1]), "bwd": ("col_c", "col", self.weight.shape[0]),
                          "mean": ("wrow_c", "wrow", self.weight.shape[1])}[key]
        approx, rn, rs = self._span(key).fit(x)
        return approx, s[norm] * rn + (s[total].abs() / n) * rs

    def forward(self, vector: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W @ vector, W^2 @ columns) as :func:`products` gives them, from earlier
        products where the bound allows (columns: the variances, then the coherent part,
        relative to the variance's product). The output channels where it does not get
        their exact rows (a float64 copy of those rows of W) while they are at most
        :data:`FIX_ROWS_BELOW` of them; beyond that, a mean that fails gets its own pass
        over W (a fifth of the cost of the squared products: no square, one column,
        and it is kept), and variances that fail return None: the caller's pass."""
        vector, columns = vector.double(), columns.double()
        rows_ = self.weight.shape[0]
        out = torch.empty((rows_, columns.shape[1]), dtype=torch.float64)
        bad = torch.zeros(rows_, dtype=torch.bool)
        for k in range(columns.shape[1]):
            approx, bound = self._bounded("fwd", columns[:, k])
            var = approx if k == 0 else var
            bad |= ~(bound <= TOLERANCE * var)
            out[:, k] = approx
        if int(bad.sum()) > FIX_ROWS_BELOW * rows_:
            return None
        mean, bound = self._bounded("mean", vector)
        off = ~(bound <= TOLERANCE * var.clamp_min(0.0).sqrt()) & ~bad
        if int((bad | off).sum()) > FIX_ROWS_BELOW * rows_:
            mean = Chunked(self.weight, False) @ vector
            self._span("mean").add(vector, mean)
            self.mean_passes += 1
        else:
            bad |= off
        fix = bad.nonzero().reshape(-1)
        if fix.numel():  # those channels exactly
            block = self.weight.detach().index_select(0, fix).double()
            mean[fix] = block @ vector
            out[fix] = block.mul_(block) @ columns
            self.fixed += fix.numel()
        self.reused += 1
        return mean, out

    def learn_forward(self, vector: torch.Tensor, columns: torch.Tensor, mean: torch.Tensor, squared: torch.Tensor) -> None:
        self.exact += 1
        for k in range(columns.shape[1]):
            self._span("fwd").add(columns[:, k].double(), squared[:, k])
        self._span("mean").add(vector.double(), mean)

    def backward(self, other: torch.Tensor) -> torch.Tensor | None:
        """(W^2)^T @ other (a vector, or columns: the gradient power first, the others
        relative to its product), from earlier products when the bound allows."""
        cols = other.double().reshape(other.shape[0], -1)
        out = torch.empty((self.weight.shape[1], cols.shape[1]), dtype=torch.float64)
        ref = None
        for k in range(cols.shape[1]):
            approx, bound = self._bounded("bwd", cols[:, k])
            ref = approx.abs() if k == 0 else ref
            if not bool((bound <= TOLERANCE * ref).all()):
                return None
            out[:, k] = approx
        self.reused += 1
        return out[:, 0] if other.dim() == 1 else out

    def learn_backward(self, other: torch.Tensor, product: torch.Tensor) -> None:
        self.exact += 1
        cols, prod = other.double().reshape(other.shape[0], -1), product.reshape(self.weight.shape[1], -1)
        for k in range(cols.shape[1]):
            self._span("bwd").add(cols[:, k], prod[:, k])
