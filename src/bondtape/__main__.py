"""``python -m bondtape``: the same as the ``bondtape`` command."""
from bondtape.entry import main

main()
