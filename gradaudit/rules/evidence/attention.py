"""Attention logits: the ops between ``q @ k^T`` and its softmax, and the layers that feed
the logits as a query or a key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradaudit.rules.evidence.ops import TRANSPARENT

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis

#: Ops between q @ k^T and the softmax that keep it "the logits" (scaling, masking).
LOGIT_PATH = TRANSPARENT | frozenset({"div", "mul", "masked_fill", "add", "sub", "float", "to"})
#: Ops between a projection and the q or k operand of attention (layout, scaling).
_SCORE_PATH = TRANSPARENT | frozenset({"mul", "div"})
_QK_MATMUL = frozenset({"matmul", "einsum", "bmm"})
_FUSED_ATTENTION = frozenset({"scaled_dot_product_attention"})


def _feeds_softmax(analysis: Analysis, node: Node) -> bool:
    """Whether ``node``'s output reaches a softmax through logit ops only (q @ k^T)."""
    users = analysis.next_nodes(node, LOGIT_PATH)
    return bool(users) and all(u.op in ("softmax", "log_softmax") for u in users)


def score_side(analysis: Analysis, node: Node) -> bool:
    """Whether every path from ``node``'s output to the loss goes through attention
    logits, as the query or the key: a q or k projection (through layout and scaling
    ops into ``q @ k^T`` before a softmax, or into the first two operands of
    ``scaled_dot_product_attention``).

    Such a layer's weight gradient is dL/d(logits) times the other operand: with the
    small q/k initialisations transformers use (std 0.02) the logits are near zero, the
    attention near uniform, and the q/k weight gradients are 100-1000x below the value and
    MLP projections' at init, while the gradient along the residual stream is intact
    (Noci et al., "Signal Propagation in Transformers", NeurIPS 2022, on the vanishing
    query/key gradients of uniform attention). It measures the attention's temperature,
    not the gradient's passage through depth, which is what the vanishing/exploding
    rules judge; the temperature has its own rule (GA402).
    """
    stack = [(node.name, u) for u in analysis.users(node.name)]
    if not stack:
        return False
    seen: set[tuple[str, str]] = set()
    while stack:
        src, user = stack.pop()
        if (src, user.name) in seen:
            continue
        seen.add((src, user.name))
        if user.op in _SCORE_PATH:
            nxt = analysis.users(user.name)
            if not nxt:
                return False
            stack.extend((user.name, v) for v in nxt)
        elif user.op in _FUSED_ATTENTION:
            if src not in user.inputs[:2] or src in user.inputs[2:]:
                return False
        elif not (user.op in _QK_MATMUL and _feeds_softmax(analysis, user)):
            return False
    return True
