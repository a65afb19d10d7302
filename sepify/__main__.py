"""``python -m sepify``: the same as the ``sepify`` command."""

from .command import run

run()
