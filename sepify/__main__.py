"""``python -m sepify``: the same as the ``sepify`` command."""

from .cli import run

run()
