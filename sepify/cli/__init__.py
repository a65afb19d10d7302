"""The ``sepify`` command (see :mod:`sepify.cli.main`; the command's entry point is
:func:`sepify.command.run`)."""

from .main import main, run

__all__ = ["main", "run"]
