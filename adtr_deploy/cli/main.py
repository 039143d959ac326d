"""The `adtr` group and the `adtr-*` entry points.

Each command lives in its own module (adtr_deploy/cli/<name>.py, attribute `command`) and is imported only when invoked, so
`adtr --help` and `adtr-run --help` never import torch. Heavy imports happen inside the command functions.
"""

from __future__ import annotations

import importlib

import click

from adtr_deploy import __version__

# sub-command -> module under adtr_deploy.cli that defines `command`
COMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "evaluate",
    "export": "export",
    "run": "run",
    "bench": "bench",
    "data": "data",
    "demo": "demo",
    "recalibrate": "recalibrate",
    "review": "review",
    "promote": "promote",
    "triton": "triton",
}


def load_command(name: str) -> click.Command:
    module = importlib.import_module(f"adtr_deploy.cli.{COMMANDS[name]}")
    return module.command


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return load_command(name) if name in COMMANDS else None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adtr-deploy")
def cli() -> None:
    """adtr-deploy: train ADTR anomaly detectors, export them, run and benchmark them on edge devices."""


def _entry(name: str):
    def main() -> None:
        cmd = load_command(name)
        # obj tells a command it owns the process (adtr-run then leaves late signals ignored until the process exits)
        cmd.main(prog_name=f"adtr-{name}", obj={"process_entry": True})

    return main


train_entry = _entry("train")
eval_entry = _entry("eval")
export_entry = _entry("export")
run_entry = _entry("run")
bench_entry = _entry("bench")
