"""The `sdrt` command line (click)."""

import click


@click.group()
def main() -> None:
    """sdrt: Stable Diffusion on CPUs and small GPUs."""
