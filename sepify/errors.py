"""Errors that the CLI turns into one line on stderr and a documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_DRIFT = 1  # verify: outputs differ beyond tolerance
EXIT_BAD_INPUT = 2  # unreadable/invalid model, bad arguments, unresolvable shapes
EXIT_INTERNAL = 3  # a bug in sepify (traceback shown with --debug)


class SepifyError(Exception):
    """Base of every error sepify raises on purpose; carries the CLI exit code."""

    exit_code = EXIT_BAD_INPUT


class ModelLoadError(SepifyError):
    """The model file cannot be read, parsed or trusted."""


class ShapeError(SepifyError):
    """A tensor shape needed for costing cannot be resolved."""


class UsageError(SepifyError):
    """Bad command-line or API arguments."""


class ParameterError(UsageError):
    """An API parameter with a value it cannot take.  The message names the parameter
    (``budget=2: must be a fraction in (0, 1]``); the CLI names the flag instead (``--budget 2: …``)."""

    def __init__(self, param: str, value, problem: str):
        self.param, self.value, self.problem = param, value, problem
        super().__init__(f"{param}={value!r}: {problem}")
