"""``python -m nbia_retriever.cli``: the same as the ``nbia-retriever`` command."""

from . import main

if __name__ == "__main__":  # importing this module (doctest collection) runs nothing
    main()
