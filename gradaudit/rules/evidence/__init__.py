"""What the rules read off an analysis, one idea per module.

Everything here reads an :class:`~gradaudit.propagation.engine.Analysis` (graph plus
predicted statistics). No module here imports a heavy library at import time, so that
listing the rule catalog stays fast; torch is imported inside the functions that need it.

:mod:`.ops` (sets of op names), :mod:`.text` (how findings write numbers and names),
:mod:`.structure` (next activation, residual adds, chains of weight layers), :mod:`.inits`
(initialisation gains), :mod:`.fixes` (the fix line a finding proposes),
:mod:`.normalization` (normalizations over too few values), :mod:`.attention` (attention
logits and the layers that feed them), :mod:`.profiles` (gradient and activation
profiles), :mod:`.crossings` (where a profile passes the limit) and :mod:`.recurrent`
(recurrent weights and the gradient over time).
"""
