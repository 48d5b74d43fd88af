"""`upcycling`: the pipeline's stages as commands (``upcycling --help``; the list is in
:mod:`upcycling.cli.main`). Each command imports its stage only when it runs, so a command whose
install extra is missing names it."""

from upcycling.cli.main import EXTRA_OF_MODULE, main

__all__ = ["EXTRA_OF_MODULE", "main"]
