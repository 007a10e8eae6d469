"""``python -m nbia_retriever.cli``: the same as the ``nbia-retriever`` command."""

from . import main

main()
