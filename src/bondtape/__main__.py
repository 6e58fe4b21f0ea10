"""``python -m bondtape``: the same as the ``bondtape`` command."""
from bondtape.cli import main

main()
