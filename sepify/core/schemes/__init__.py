"""The scheme registry: every decomposition family sepify knows, by name.

Adding a scheme is one module here (a :class:`~sepify.core.schemes.base.Scheme` subclass) and its
line below; the planner, the audit, the rewrite, calibration and the CLI all read the registry.
"""

from __future__ import annotations

from .base import Scheme
from .dwpw import DwPw
from .lowrank import InLowRank, OutLowRank, PwLowRank
from .pwdw import PwDw
from .spatial import Spatial
from .tucker2 import Tucker2

REGISTRY: dict[str, Scheme] = {s.name: s for s in (DwPw(), PwDw(), Spatial(), OutLowRank(), InLowRank(),
                                                    PwLowRank(), Tucker2())}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Scheme:
    """The scheme called ``name`` (a ValueError naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r} (one of {', '.join(REGISTRY)})") from None


def all_schemes() -> tuple[Scheme, ...]:
    return tuple(REGISTRY.values())


__all__ = ["REGISTRY", "Scheme", "all_schemes", "get", "names"]
