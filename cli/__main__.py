"""`python -m sdrt.cli`: the `sdrt` command."""

from sdrt.cli.main import main

main(prog_name="sdrt")
