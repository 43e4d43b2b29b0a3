"""The error tree: stable, unique, documented wire codes."""

from __future__ import annotations

import re

from realtime import errors
from tests.conftest import REPO

#: Base classes that are caught, never raised: their codes are not on the wire on their own.
ABSTRACT = {errors.RealtimeError, errors.ProtocolError, errors.ServingError}


def _leaves() -> list[type[errors.RealtimeError]]:
    found, pending = [], [errors.RealtimeError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [c for c in found if c not in ABSTRACT]


def test_codes_are_snake_case_and_unique() -> None:
    codes = [c.code for c in _leaves()]
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", c) for c in codes)
    assert len(codes) == len(set(codes)), sorted(codes)


def test_every_wire_code_is_documented_with_its_retryable_flag() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text().split("## Error codes")[1].split("\n## ")[0]
    table = dict(re.findall(r"^\| `([a-z_]+)` \| (yes|no) \|", doc, re.MULTILINE))
    start_up = ("model_load_failed", "bad_config")
    on_wire = {c.code: c.retryable for c in _leaves() if c.code not in start_up}
    assert {code: ("yes" if r else "no") for code, r in on_wire.items()} == table
