"""The rule catalog: one module per rule, registered in :mod:`gradaudit.rules.base`; what the
rules read off an analysis is in :mod:`gradaudit.rules.evidence`."""
