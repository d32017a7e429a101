"""GA901 unused-noqa."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register


@register
class UnusedNoqa(Rule):
    """A `# gradaudit: noqa` comment suppresses nothing.

    ## What it does
    Reports every `# gradaudit: noqa` comment, in the files the audited model is written
    in, that matched no finding: a bare `noqa` on a line with no finding, or codes in
    `noqa[...]` that no finding on that line carries (or that are not rule codes at all).
    Suppressions are matched on the source line where a layer is defined
    (`self.fc = nn.Linear(...)`) or called (`x = self.fc(x)`).

    ## Why is this bad?
    A stale suppression hides the next real problem on that line: when the model
    changes and the layer starts to vanish or explode again, nobody is told. Unused
    suppressions also tell readers that a problem exists where there is none.

    ## Example
    ```python
    self.fc = nn.Linear(256, 256)  # gradaudit: noqa[GA102]
    ```
    when no GA102 finding is reported for `fc`.

    ## Use instead
    ```python
    self.fc = nn.Linear(256, 256)
    ```

    ## References
    - ruff, rule RUF100 `unused-noqa`: https://docs.astral.sh/ruff/rules/unused-noqa/
    """

    code = "GA901"
    name = "unused-noqa"
    category = "other"
    default_severity = "info"
    #: Emitted by :func:`gradaudit.suppress.apply` after the other rules ran, never by
    #: the static or probe stage.
    stage = "suppression"

    def check(self, analysis) -> Iterator[Finding]:
        """Nothing to find in the graph: unused suppressions come from the suppression pass."""
        return iter(())
