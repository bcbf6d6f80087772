"""`python -m meshnode.cli` runs the `meshnode` command."""

from meshnode.cli import main

main()
