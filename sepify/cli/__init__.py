"""The ``sepify`` command (see :mod:`sepify.cli.main`)."""

from .main import main

__all__ = ["main"]
