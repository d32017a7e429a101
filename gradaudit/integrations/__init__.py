"""gradaudit inside training frameworks: :mod:`~gradaudit.integrations.lightning`
(``GradauditCallback`` for Lightning) and :mod:`~gradaudit.integrations.transformers`
(``GradauditTrainerCallback`` for the Hugging Face ``Trainer``). Each imports its framework
only when imported itself; gradaudit does not depend on either."""
