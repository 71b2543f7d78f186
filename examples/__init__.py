"""Worked examples: distilling a package teacher into models of your own
(docs/own_models.md). Importable, so the CLI can take their models by import path,
e.g. `--config.student.model=examples.cnn_linen:SmallCNN` from the repository root."""
