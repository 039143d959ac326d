"""Command-line interface: one click command per module, imported lazily so `--help` stays fast and torch-free."""
