"""The one frozen configuration of a server, built once at start."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from realtime.admission import AdmissionPolicy
from realtime.auth import ApiKey
from realtime.errors import ConfigError
from realtime.session import Limits


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "realtime" / "graphs"


def usable_cores() -> int:
    """The cores this process may run on (a cpuset or ``taskset`` confines it to fewer than
    the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _default_workers() -> int:
    # More model threads than cores to run them only adds thread hops: confined to one core,
    # 2 workers cost ~5 % more CPU per chunk than 1 (3 runs each, 100 speech_activity clients).
    return min(4, usable_cores())


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a server needs to know, from flags (and later files)."""

    host: str = "127.0.0.1"
    port: int = 8765
    #: Port of the Open Inference Protocol's gRPC service (None: no gRPC; 0: any free port).
    grpc_port: int | None = None
    model_dirs: tuple[Path, ...] = ()
    builtin_models: bool = True
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    #: Batches run at once (per model and in all); one per core is right for small models.
    workers: int = field(default_factory=_default_workers)
    #: ONNX Runtime threads inside one batch; raise it for few, large models on many cores.
    intra_op_threads: int = 1
    #: While the server is busy, a model's batches wait up to this many times its
    #: ``max_delay_ms`` to fill (1: never longer; see :meth:`realtime.scheduler.Scheduler.pace`).
    batch_stretch: float = 4.0
    #: Chunks waiting per model version before new ones are refused with ``overloaded``.
    max_queue: int = 4096
    #: Sessions connected at once in all; past it a handshake gets HTTP 503 (server_busy).
    max_connections: int = 1024
    #: Admission control of new sessions and streams (realtime.admission, docs/scheduler.md).
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)
    #: Shed live chunks by their age once the server is behind (a chunk read after its deadline,
    #: one that waited for its batch with a newer one behind it; docs/scheduler.md,
    #: "Backpressure and load shedding"). None: while admission control is on.
    shed_by_age: bool | None = None
    #: Results waiting to be written to one client before it is disconnected as too slow.
    max_outbox: int = 4096
    #: Seconds one batch may run; past it its items fail (inference_failed) and its worker is
    #: given up on (replaced; /healthz reports it until it comes back).
    batch_timeout_seconds: float = 10.0
    #: Seconds in-flight batches get to finish on shutdown.
    drain_seconds: float = 5.0
    #: Seconds, after draining, that clients get to read their answers and close first (and
    #: clients whose connection dropped, to resume and do the same); it ends as soon as they have.
    close_grace_seconds: float = 1.0
    #: Run every model at every batch size before serving (off only to start test servers fast).
    warm_up: bool = True
    #: Optimized ONNX graphs kept between starts (see runtime.RuntimeOptions.cache_dir).
    graph_cache: Path | None = field(default_factory=lambda: _default_cache())
    #: Seconds between looks at the model folders for new or removed versions (0: only SIGHUP).
    reload_seconds: float = 2.0
    #: API keys (realtime.auth). Empty: no authentication, allowed on loopback only.
    keys: Mapping[str, ApiKey] = field(default_factory=dict)
    #: Browser origins allowed to connect (the Origin header); empty: any.
    allowed_origins: tuple[str, ...] = ()
    #: TLS certificate chain and key (PEM): serve wss://.
    certfile: Path | None = None
    keyfile: Path | None = None
    #: Where sessions are handed to the next server process on shutdown (None: they end).
    resume_dir: Path | None = None
    #: Listen with SO_REUSEPORT beside sibling processes (a child of ``--processes N``).
    reuse_port: bool = False
    #: The supervisor's private folder where sibling processes find each other (realtime.store).
    peer_dir: Path | None = None
    #: Redis URL of the shared session store (realtime.redis_store); None: none.
    redis_url: str | None = None
    #: With Redis: seconds between checkpoints of each changed session (docs/deploy.md).
    checkpoint_seconds: float = 1.0
    #: Serve without authentication on a non-loopback address (behind a trusted gateway only).
    insecure_no_auth: bool = False

    @property
    def sheds_by_age(self) -> bool:
        """Whether live chunks are shed by their age (:attr:`shed_by_age`, resolved)."""
        return self.admission.enabled if self.shed_by_age is None else self.shed_by_age

    def check(self) -> None:
        """Refuse configurations that would expose the server by mistake."""
        if not self.keys and not self.insecure_no_auth and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to serve {self.host} without authentication: give --keys (or "
                "REALTIME_API_KEYS), or --insecure-no-auth behind a gateway that checks clients"
            )
        if self.redis_url is not None and not self.checkpoint_seconds > 0:
            raise ConfigError("--checkpoint-seconds must be above 0")
        if not self.batch_stretch >= 1:
            raise ConfigError("--batch-stretch must be at least 1")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("--certfile and --keyfile go together")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or name."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
