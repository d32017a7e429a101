"""GA402 unscaled-attention."""

from __future__ import annotations

import math
from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.attention import LOGIT_PATH
from gradaudit.rules.evidence.ops import TRANSPARENT
from gradaudit.rules.evidence.text import fmt, module_expr, where
_SCALING = frozenset({"div", "mul"})


@register
class UnscaledAttention(Rule):
    """Attention logits so large that the softmax saturates (missing 1/sqrt(d) scale or
    oversized q/k projections).

    ## What it does
    Reads the predicted variance of the attention logits: for
    ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` from their
    handlers (Var[s q.k] = s^2 d E[q^2] E[k^2]), for hand-written attention from the
    predicted statistics of the softmax input when it comes from ``q @ k.transpose()``
    (or ``einsum``). Reports when the logit standard deviation is at least 5 (setting
    ``attention_logit_std``), saying whether the 1/sqrt(d) scale is missing.

    ## Why is this bad?
    The dot product of two d-dimensional vectors with independent unit-variance entries
    has variance d (Vaswani et al. 2017): at d = 64 the unscaled logits have standard
    deviation 8, the softmax puts nearly all its mass on one key, and its Jacobian
    diag(p) - p p^T is nearly zero, so almost no gradient reaches q and k. The same
    happens with the scale in place when the q/k projections are initialised too large.

    ## Example
    ```python
    scores = q @ k.transpose(-2, -1)                 # std ~ sqrt(d)
    attn = torch.softmax(scores, dim=-1)
    ```

    ## Use instead
    ```python
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    attn = torch.softmax(scores, dim=-1)
    # or: F.scaled_dot_product_attention(q, k, v)
    ```

    ## References
    - Vaswani et al., "Attention Is All You Need", NeurIPS 2017, Sec. 3.2.1.
    - Dehghani et al., "Scaling Vision Transformers to 22 Billion Parameters", ICML 2023
      (attention logit growth).
    """

    code = "GA402"
    name = "unscaled-attention"
    category = "saturation"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        limit = float(settings.extra.get("attention_logit_std", 5.0))
        for node in analysis.graph:
            if node.op in ("scaled_dot_product_attention", "multihead_attention"):
                f = self._fused(analysis, node, limit)
            elif node.op == "softmax":
                f = self._hand_written(analysis, node, limit)
            else:
                f = None
            if f is not None:
                yield f

    def _fused(self, analysis, node, limit: float) -> Finding | None:
        info = analysis.effect_info(node.name)
        att = info.get("attention")
        if not att:
            return None
        std = float(att.get("logit_std", math.sqrt(max(att.get("logit_var", 0.0), 0.0))))
        if not std >= limit:
            return None
        d = info.get("head_dim", att.get("head_dim"))
        scale = info.get("scale", att.get("scale"))
        p2, ratio = att.get("p2"), att.get("entropy_ratio")
        sat = ""
        if p2 and ratio:
            n = ratio / p2
            sat = f"; sum of squared attention weights {fmt(p2)} per query (1/{n:.0f} = {fmt(1 / n)} if uniform, 1 if one-hot)"
        if node.op == "scaled_dot_product_attention" and d and scale and scale * math.sqrt(d) > 1.5:
            why = f"scale={fmt(scale)} instead of 1/sqrt({d}) = {fmt(1 / math.sqrt(d))}"
            fix = "F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(head_dim)"
        else:
            why = "the q/k inputs or projections are too large for the 1/sqrt(d) scale"
            if node.op == "multihead_attention" and node.module:
                fix = f"nn.init.xavier_uniform_({module_expr(node.module)}.in_proj_weight)"
            else:
                fix = "q, k = q / q.std(), k / k.std()  # or initialise the q/k projections with xavier_uniform_"
        return self.finding(
            f"predicted attention logit std {fmt(std)} at '{where(node)}' (head dim {d}): {why}; the softmax "
            f"saturates and passes almost no gradient to q and k{sat}",
            node=node,
            fix=fix,
            logit_std=std,
            head_dim=d,
            scale=scale,
        )

    def _hand_written(self, analysis, node, limit: float) -> Finding | None:
        src = node.inputs[0] if node.inputs else None
        if src is None:
            return None
        s = analysis.stat(src)
        if s is None:
            return None
        std = math.sqrt(s.var)
        if not std >= limit:
            return None
        mm, scaled = _find_qk(analysis, analysis.graph[src])
        if mm is None:
            return None
        a, b = mm.inputs[0], mm.inputs[1]  # _find_qk returns a product of two computed tensors
        sa, sb = analysis.stat(a), analysis.stat(b)
        d = analysis.graph[a].shape[-1] if analysis.graph[a].shape else None
        qk = (
            f"; E[q^2] = {fmt(sa.m2)}, E[k^2] = {fmt(sb.m2)} over d = {d}, Var(q.k) ~ d E[q^2] E[k^2]"
            if sa is not None and sb is not None and d
            else ""
        )
        loc = f" at {mm.location}" if mm.location else ""
        if scaled:
            why = "the logits are scaled but q and k are too large"
            projs = [p for p in (_projection(analysis, a), _projection(analysis, b)) if p is not None]
            if projs:
                fix = "; ".join(f"nn.init.xavier_uniform_({module_expr(p.module)}.weight)" for p in projs)
            else:
                fix = f"q, k = q / q.std(), k / k.std()  # before q @ k^T{loc}"
        else:
            why = "no 1/sqrt(d) scale between q @ k^T and the softmax"
            fix = f"scores = q @ k.transpose(-2, -1) / math.sqrt({d or 'head_dim'})  # {loc.strip() or 'before softmax'}"
        return self.finding(
            f"predicted attention logit std {fmt(std)} going into the softmax '{where(node)}' ({why}{qk}): the "
            f"softmax saturates and passes almost no gradient to q and k",
            node=node,
            fix=fix,
            logit_std=std,
            head_dim=d,
            scaled=scaled,
        )


def _projection(analysis, name: str):
    """The linear layer that produced an operand of q @ k^T (through layout ops), if any."""
    node = analysis.graph[name]
    srcs = [node] if node.op == "linear" else analysis.prev_nodes(node, TRANSPARENT) if node.op in TRANSPARENT else []
    for src in srcs:
        if src.op == "linear" and src.module:
            return src
    return None


def _find_qk(analysis, node):
    """Walk back from the softmax input through scaling/masking/layout ops to a
    ``matmul``/``einsum`` of two computed tensors; return it and whether a scaling op
    (div/mul) lies on the way."""
    scaled = False
    cur = node
    for _ in range(16):
        if cur.op in ("matmul", "einsum") and len(cur.inputs) >= 2:
            return cur, scaled
        if cur.op not in LOGIT_PATH or not cur.inputs:
            return None, scaled
        if cur.op in _SCALING:
            scaled = True
        cur = analysis.graph[cur.inputs[0]]
    return None, scaled
