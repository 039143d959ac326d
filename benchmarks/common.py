"""Kept for scripts that still do `from common import ...` (benchmarks/soak.py): the helpers live in the package now,
adtr_deploy/bench/studies.py, where every other benchmark imports them from."""

from adtr_deploy.bench.studies import command_line, machine, write_result

__all__ = ["command_line", "machine", "write_result"]
