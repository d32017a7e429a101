"""The rule catalog: one module per rule, registered in :mod:`gradaudit.rules.base`."""
