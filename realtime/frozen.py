"""Pickling the frozen dataclasses of the modules that mypyc compiles (setup.py)."""

from __future__ import annotations

import dataclasses
from typing import Any


def by_fields(obj: Any) -> tuple[Any, ...]:
    """``__reduce__`` of a frozen dataclass: rebuilt by calling its class with its fields.
    A compiled class cannot have its frozen fields set one by one after it is made, which is
    how pickle rebuilds one otherwise."""
    return (type(obj), tuple(getattr(obj, f.name) for f in dataclasses.fields(obj)))
