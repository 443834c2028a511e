"""``python -m packmule``: the same as the ``packmule`` command."""

from packmule.cli import main

main()
