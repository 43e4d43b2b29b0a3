"""Model versions loaded and retired while serving, from the ``--models`` folders.

A new version folder is loaded, checked with a warm-up run before it takes traffic, then is the
default for new streams if its version is highest; a folder that is gone is taken out of the
catalog (its open streams go on); a broken one is refused with a log line, and the versions
already loaded keep serving. Versions are immutable: a changed file is a new version folder.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from realtime import errors
from realtime.config import Config
from realtime.models.repository import ModelRepository, load_model, versions
from realtime.models.spec import Model, RuntimeOptions
from realtime.scheduler import Scheduler
from realtime.traffic import Traffic

log = logging.getLogger("realtime")


def signature(folder: Path) -> tuple[tuple[int, int], ...]:
    """Size and mtime of a version folder's files: a change means a copy is under way."""
    out = []
    for name in ("model.onnx", "model.toml"):
        try:
            st = (folder / name).stat()
        except OSError:
            out.append((-1, -1))
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


class Reloader:
    """Keeps the served model versions in step with the model folders."""

    def __init__(
        self,
        config: Config,
        models: list[Model],
        repository: ModelRepository,
        scheduler: Scheduler,
        traffic: Traffic,
    ) -> None:
        self._config = config
        self._models = models
        self._repository = repository
        self._scheduler = scheduler
        self._traffic = traffic
        #: Each model folder version's file signature, as last loaded or refused.
        self._seen = {m.path.parent: signature(m.path.parent) for m in models}
        self._lock = asyncio.Lock()

    def _count(self, result: str) -> None:
        self._traffic.reloads[result] = self._traffic.reloads.get(result, 0) + 1

    async def poll(self) -> None:
        """Reload every ``reload_seconds``, forever."""
        while True:
            await asyncio.sleep(self._config.reload_seconds)  # a period, not a wait for an event
            await self.reload()

    async def reload(self) -> dict[str, list[str]]:
        """One pass over the model folders; what was added, removed and refused."""
        async with self._lock:
            config = self._config
            done: dict[str, list[str]] = {"added": [], "removed": [], "refused": []}
            loop = asyncio.get_running_loop()
            present: dict[Path, tuple[str, str]] = {}
            for root in config.model_dirs:
                try:
                    found = await loop.run_in_executor(None, versions, root)
                except errors.ModelLoadError as e:
                    log.error("event=reload_refused error=%s", e)
                    continue
                present.update({folder: (name, version) for name, version, folder in found})
            options = RuntimeOptions(
                intra_op_threads=config.intra_op_threads, cache_dir=config.graph_cache
            )
            for folder, (name, version) in sorted(present.items()):
                sig = await loop.run_in_executor(None, signature, folder)
                if self._seen.get(folder) == sig:
                    continue
                self._seen[folder] = sig
                key = f"{name}@{version}"
                loaded = self._repository.get(name, version)
                if loaded is not None and loaded.path.parent == folder:
                    continue  # versions are immutable: a changed file is a new version folder
                try:
                    model = await loop.run_in_executor(
                        None, load_model, name, version, folder, options
                    )
                    queue = self._scheduler.add_model(model)
                    await loop.run_in_executor(None, queue.warm_up)
                except Exception as e:  # any failure refuses this version, nothing else
                    self._count("refused")
                    done["refused"].append(key)
                    log.error("event=reload_refused model=%s error=%s", key, str(e)[:300])
                    continue
                self._repository.add(model)
                self._models.append(model)
                self._count("added")
                done["added"].append(key)
                log.info("event=model_added model=%s path=%s", key, folder)
            for model in list(self._models):
                folder = model.path.parent
                if folder in present or not any(
                    folder.is_relative_to(r) for r in config.model_dirs
                ):
                    continue
                self._repository.remove(model.name, model.version)
                self._models.remove(model)
                self._seen.pop(folder, None)
                self._count("removed")
                done["removed"].append(model.key)
                log.info("event=model_removed model=%s", model.key)
            return done
