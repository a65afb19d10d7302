"""The ``sepify`` command (see :mod:`sepify.cli.main`)."""

from .main import main, run

__all__ = ["main", "run"]
