"""Registries by name: the methods (distillers) and their criteria are looked up in tables
filled by a class decorator, not by if/elif chains."""
from __future__ import annotations

from typing import Callable, Dict, TypeVar

T = TypeVar("T")


def registrar(table: Dict[str, type], name_attribute: str) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: ``@register("kd")`` adds the class to ``table`` under "kd" and
    sets its ``name_attribute`` to "kd"."""
    def register(name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in table:
                raise ValueError(f"{name!r} is registered twice ({table[name].__name__} and "
                                 f"{cls.__name__})")
            table[name] = cls
            setattr(cls, name_attribute, name)
            return cls
        return add
    return register
