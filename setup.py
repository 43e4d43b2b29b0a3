"""Builds ``realtime``: the per-chunk modules compiled to C by mypyc, the rest pure Python.

Every message of every client runs through these modules, and the interpreter was most of the
server's CPU (README, "Performance"). mypyc compiles them from the same type-checked source: no
second language, and each module still runs as plain Python where it is not compiled.

- ``pip install .`` compiles them. Without a C compiler (or if mypyc fails), the install goes on
  in pure Python, and says so.
- ``pip install -e .`` stays pure Python: a compiled module beside its source would shadow every
  later edit of it. ``REALTIME_COMPILE=1 pip install -e .`` compiles in place anyway (for
  benchmarks; ``realtime`` warns at import when a compiled module is older than its source);
  ``REALTIME_COMPILE=1`` also makes a failed compile an error. ``REALTIME_COMPILE=0``: never.

A compiled class is pickled (a session handed to another server) only if it says how:
``@mypyc_attr(serializable=True)`` on dataclasses, with ``allow_interpreted_subclasses=True`` on
classes with their own ``__init__`` (without it mypyc's serializable classes skip ``__init__``),
and ``__reduce__`` (:func:`realtime.frozen.by_fields`) on frozen dataclasses.

The ``__init__`` that ``@dataclass`` writes is made at import and runs interpreted, even in a
compiled class: 6-7x the cost of one written out, which mypyc compiles (about 0.4 against
0.06 µs). The dataclasses built once or more per chunk (``WorkItem``, ``Prediction``, ``Result``
and the like) therefore say ``init=False`` and write theirs (and so take
``allow_interpreted_subclasses=True`` to stay picklable); together they were 14 % of the event
loop's instructions per chunk.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

#: The modules a chunk goes through, from the bytes of its frame to its result's.
COMPILED = [
    "realtime/framing.py",
    "realtime/protocol.py",
    "realtime/connection.py",
    "realtime/session.py",
    "realtime/audio.py",
    "realtime/batching.py",
    "realtime/scheduler.py",
    "realtime/ratelimit.py",
    "realtime/quotas.py",
    "realtime/relay.py",
    "realtime/traffic.py",
    "realtime/events/__init__.py",
    "realtime/events/speech.py",
    "realtime/events/segments.py",
    "realtime/events/notes.py",
    "realtime/events/labels.py",
]


def _ext_modules() -> list[object]:
    wanted = os.environ.get("REALTIME_COMPILE", "")
    if wanted == "0" or (wanted != "1" and "editable_wheel" in sys.argv):
        return []
    try:
        from mypyc.build import mypycify

        extensions = mypycify(COMPILED, opt_level="3")
    except (Exception, SystemExit) as e:  # mypyc exits on a type error
        if wanted == "1":
            raise
        print(f"realtime: not compiled ({e!r}); installing pure Python", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: that module stays pure Python
    return extensions


setup(ext_modules=_ext_modules())
