"""`adtr data` (placeholder until its issue lands)."""

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def command() -> None:
    """Not implemented yet: this command is being built."""
    raise click.ClickException("this command is not implemented yet")
