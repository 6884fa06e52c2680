"""``Frozen``: what ``dataclass(frozen=True)`` generates, written out once for the classes that
every command builds.

Why not the dataclass: importing ``dataclasses`` (it imports inspect, ast and dis) and generating
the classes cost ~30 ms of CPU per ``bundler unpack``, a tenth of the command. ``Settings`` and the
manifest's records are built by every command, so they use this instead.
"""

from __future__ import annotations


class Frozen:
    """Fields set once by ``__init__``, compared, hashed and shown by value, never assigned again.

    Subclasses list their fields in ``_fields`` (``_hidden``: fields ``repr`` leaves out, such as
    a secret) and set them through ``self.__dict__`` or ``object.__setattr__``.
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _hidden: frozenset[str] = frozenset()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._hidden)
        return f"{type(self).__qualname__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise _frozen(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise _frozen(f"cannot delete field {name!r}")


def _frozen(message: str) -> Exception:
    """The error a frozen dataclass raises (``dataclasses`` imported only on this misuse)."""
    import dataclasses

    return dataclasses.FrozenInstanceError(message)
