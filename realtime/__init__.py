"""realtime: model predictions for live applications over one persistent WebSocket."""

import warnings
from pathlib import Path

__version__ = "0.1.0"


def _warn_stale() -> None:
    """A module compiled in place (``REALTIME_COMPILE=1 pip install -e .``, setup.py) and
    edited since is imported compiled, old: say so rather than run code that is not the
    source's. Only in a checkout: an installed wheel's files carry the time they were unpacked,
    in whatever order."""
    package = Path(__file__).parent
    if not (package.parent / "setup.py").exists():
        return
    # A module's own .so is a shim, left as it was when only its code changed: the code is in
    # the library that mypyc builds for all of them, beside the package.
    shared = max((lib.stat().st_mtime for lib in package.parent.glob("*__mypyc*.so")), default=0)
    for so in package.glob("**/*.so"):
        py = so.with_name(so.name.split(".", 1)[0] + ".py")
        if py.exists() and py.stat().st_mtime > max(so.stat().st_mtime, shared):
            warnings.warn(
                f"{so} is older than {py.name} and runs its old code: rebuild it "
                "(REALTIME_COMPILE=1 pip install -e .) or delete it",
                stacklevel=2,
            )


_warn_stale()
