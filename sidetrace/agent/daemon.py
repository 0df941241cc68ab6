"""The daemon: builds components from config, starts and stops them, reloads on SIGHUP.

One asyncio loop runs everything. Components start in registry order and stop in reverse;
SIGTERM and SIGINT stop them within ``STOP_SECONDS``, and win over a reload in progress (it
finishes first; no READY=1 follows). SIGHUP reloads the config file and changes only the
components whose section changed (in place, for those that can take a new section without
stopping), rolling back to the old config (which keeps serving) when the new one is invalid or a
changed component fails to start. ``agent.data_dir`` is held with a lock file for the whole run; a
new value takes effect at the next start.

The daemon is the only collector in the metric registry: it gathers the running components'
metrics, merging families of the same name, so a component stopped (or left behind by a stop that
timed out) is never exported, and never twice.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import platform
import signal
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace import __version__
from sidetrace._aio import within
from sidetrace._files import DataDirInUse, DataDirLock, make_private_dirs
from sidetrace.agent.components import REGISTRY, Component, Context, Links, Registration
from sidetrace.agent.logs import configure_logging
from sidetrace.agent.systemd import Notifier
from sidetrace.config import Config, ConfigError, load

log = logging.getLogger("sidetrace.daemon")

STOP_SECONDS = 10.0
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024


def return_freed_buffers() -> bool:
    """Keep request-sized buffers (OTLP bodies, spool batches) out of the malloc heap, so memory a burst
    used goes back to the system when the burst ends.

    glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, after which request
    bodies live in the heap and fragment it: after a burst of 300k spans the agent kept about 20 MiB it
    no longer used (bench/RESULTS.md). A fixed threshold keeps them in their own mappings. False where
    the C library has no mallopt (it is then left as it is).
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class Daemon:
    """The agent process: owns the metric store, the components and the signal handlers."""

    def __init__(self, config: Config, config_path: str | None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.registry = CollectorRegistry(auto_describe=False)
        self._process = ProcessCollector(registry=None)
        self.registry.register(self)
        self.links = Links()
        self._lock: DataDirLock | None = None
        self._reloading = asyncio.Lock()
        self._components: dict[str, Component] = {}
        self._ready = False
        self._started_at = time.time()
        self._reloads = 0
        self._reload_failures = 0
        self._last_reload_ok = True
        self._last_reload_error: str | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()

    # lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the process exit code."""
        return_freed_buffers()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            self.config.data_path  # noqa: B018 - load(verify=True) refuses what raises here; a bare load() does not
        except ValueError as exc:
            log.error("%s: agent.data_dir: %s", self.config_path or "defaults", exc)
            return 2
        try:
            make_private_dirs(self.config.data_path)
        except OSError as exc:
            log.error("%s: agent.data_dir: cannot create %s: %s", self.config_path or "defaults", self.config.data_path,
                      exc.strerror or exc)
            return 2
        self._lock = DataDirLock(self.config.data_path)
        try:
            self._lock.acquire()
        except DataDirInUse as exc:
            log.error("%s: agent.data_dir: %s", self.config_path or "defaults", exc)
            return 2
        except OSError as exc:
            log.error("%s: agent.data_dir: cannot use %s: %s", self.config_path or "defaults", self.config.data_path,
                      exc.strerror or exc)
            return 2
        try:
            self._components = await self._start(self.config, REGISTRY)
        except RuntimeError as exc:
            log.error("%s; stopping", exc)
            self._lock.release()
            return 1
        self._ready = True
        self.notifier.notify(f"READY=1\nSTATUS=serving on {self.config.server.listen}\nMAINPID={os.getpid()}")
        log.info("sidetrace %s ready: %s", __version__, ", ".join(self._components),
                 extra={"version": __version__, "components": list(self._components)})
        background = [asyncio.create_task(self._reload_loop(), name="reload")]
        if self.notifier.watchdog_interval:
            background.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval), name="watchdog"))
        await self._stop.wait()
        log.info("stopping")
        self._ready = False
        self.notifier.notify("STOPPING=1")
        async with self._reloading:  # a reload in progress finishes (bounded by STOP_SECONDS per step) first
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._stop_components(self._components, time.monotonic() + STOP_SECONDS)
        self._lock.release()
        log.info("stopped")
        return 0

    def _context(self, config: Config) -> Context:
        return Context(config=config, registry=self.registry, daemon_status=self.status, not_ready=self.not_ready,
                       links=self.links)

    def not_ready(self) -> list[str]:
        """Why the agent is not ready: starting or stopping, or a component that is configured but not running
        (netsample with no interface it can sample, nats_trace still connecting), each as "NAME STATE"."""
        if not self._ready:
            return ["stopping" if self._stop.is_set() else "starting"]
        return [f"{name} {state}" for name, component in list(self._components.items())
                if (state := component.status()["state"]) != "running"]

    async def _start(self, config: Config, registrations: tuple[Registration, ...]) -> dict[str, Component]:
        """Start the enabled components in order; on a failure stop those started and raise."""
        context = self._context(config)
        started: dict[str, Component] = {}
        for registration in registrations:
            if not registration.enabled(config):
                continue
            try:
                component = registration.build(config, context)
                await component.start()
            except Exception as exc:
                await self._stop_components(started, time.monotonic() + STOP_SECONDS)
                raise RuntimeError(f"{registration.name} failed to start: {exc}") from exc
            started[registration.name] = component
        return started

    async def _stop_components(self, components: dict[str, Component], deadline: float) -> None:
        for name, component in reversed(list(components.items())):
            try:
                await within(component.stop(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.error("%s did not stop before the %.0f s deadline; leaving it", name, STOP_SECONDS)
            except Exception as exc:
                log.error("%s failed to stop cleanly: %s", name, exc)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # reload ------------------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file and apply it; on any failure keep running on the old config."""
        async with self._reloading:
            if self._stop.is_set():
                return False
            # MONOTONIC_USEC lets Type=notify-reload units match this reload to their request.
            self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                warnings: list[str] = []
                new = load(self.config_path, verify=True, warnings=warnings)
                for line in warnings:
                    log.warning("%s", line)
                ok = await self._apply(new)
            except ConfigError as exc:
                ok = self._reload_failed("; ".join(exc.problems))
            except Exception as exc:  # a bug must not end the reload loop: later SIGHUPs still work
                log.exception("reload failed unexpectedly")
                ok = self._reload_failed(f"{type(exc).__name__}: {exc}")
            if not self._stop.is_set():  # a SIGTERM meanwhile wins: systemd must not see READY again
                self.notifier.notify("READY=1")
            return ok

    async def _apply(self, new: Config) -> bool:
        old = self.config
        if new.agent.data_dir != old.agent.data_dir:
            log.warning("agent.data_dir changed from %s to %s: it takes effect when the agent restarts; until then "
                        "the spool and lock stay in %s", old.agent.data_dir, new.agent.data_dir, old.agent.data_dir)
            new = dataclasses.replace(new, agent=dataclasses.replace(new.agent, data_dir=old.agent.data_dir))
        changed = tuple(r for r in REGISTRY if r.section(new) != r.section(old))
        if not changed:
            self._reload_succeeded(new)
            log.info("reloaded %s: nothing changed", self.config_path)
            return True
        try:
            await self._change(changed, new)
        except RuntimeError as exc:
            try:
                await self._change(changed, old)
            except RuntimeError as again:
                log.error("could not restore the previous config either: %s", again)
            return self._reload_failed(str(exc))
        self._reload_succeeded(new)
        log.info("reloaded %s; changed %s", self.config_path, ", ".join(r.name for r in changed))
        return True

    async def _change(self, changed: tuple[Registration, ...], config: Config) -> None:
        """Bring the ``changed`` components to ``config``: in place where they can, else stop and start them.

        Raises RuntimeError naming the component that failed.
        """
        context = self._context(config)
        restart = []
        for registration in changed:
            component = self._components.get(registration.name)
            if component is None or not registration.enabled(config) or not hasattr(component, "reconfigure"):
                restart.append(registration)
                continue
            try:
                await within(component.reconfigure(registration.section(config), context), STOP_SECONDS)
            except Exception as exc:
                raise RuntimeError(f"{registration.name} failed to reconfigure: {exc}") from exc
        running = {r.name: self._components.pop(r.name) for r in restart if r.name in self._components}
        await self._stop_components(running, time.monotonic() + STOP_SECONDS)
        self._adopt(await self._start(config, tuple(restart)))

    def _adopt(self, started: dict[str, Component]) -> None:
        """Add freshly started components, keeping registry order for the next stop."""
        merged = {**self._components, **started}
        self._components = {r.name: merged[r.name] for r in REGISTRY if r.name in merged}

    def _reload_succeeded(self, new: Config) -> None:
        self.config = new
        configure_logging(new.agent.log_level, new.agent.log_format)
        self._reloads += 1
        self._last_reload_ok = True
        self._last_reload_error = None

    def _reload_failed(self, why: str) -> bool:
        self._reload_failures += 1
        self._last_reload_ok = False
        self._last_reload_error = why
        log.error("reload failed, still running on the previous config: %s", why)
        return False

    # observability -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        components: dict[str, Any] = {}
        for registration in REGISTRY:
            component = self._components.get(registration.name)
            if component is not None:
                components[registration.name] = component.status()
            elif not registration.enabled(self.config):
                components[registration.name] = {"state": "disabled", "detail": "", "last_error": None}
            else:
                components[registration.name] = {"state": "not started", "detail": "", "last_error": None}
        return {
            "version": __version__,
            "python": platform.python_version(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self._started_at, 1),
            "config_path": self.config_path,
            "ready": not (not_ready := self.not_ready()),
            "not_ready": not_ready,
            "last_reload_error": self._last_reload_error,
            "components": components,
        }

    def collect(self) -> Iterator[Metric]:
        """Every metric of the agent (prometheus_client's Collector interface): the process's, the running
        components', and the daemon's own. Families of one name from several components are merged."""
        merged: dict[str, Metric] = {}
        sources = [self._process.collect, self._own_metrics] + [
            component.collect for component in list(self._components.values()) if hasattr(component, "collect")]
        for source in sources:
            try:
                families = list(source())
            except Exception:  # one broken collector must not empty the whole endpoint
                log.exception("collecting metrics failed")
                continue
            for family in families:
                kept = merged.get(family.name)
                if kept is None:
                    merged[family.name] = family
                elif kept.type == family.type:
                    kept.samples.extend(family.samples)
                else:
                    log.error("metric %s is emitted as both %s and %s; keeping the first", family.name, kept.type,
                              family.type)
        return iter(merged.values())

    def _own_metrics(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("sidetrace_build_info", "The agent's version and Python.",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield CounterMetricFamily("sidetrace_config_reloads_total", "Config reloads applied.", value=self._reloads)
        yield CounterMetricFamily(
            "sidetrace_config_reload_failures_total",
            "Config reloads refused (invalid file, or a changed component failed to start); the old config stays.",
            value=self._reload_failures,
        )
        yield GaugeMetricFamily(
            "sidetrace_config_last_reload_successful", "1 if the last reload applied, else 0.",
            value=1 if self._last_reload_ok else 0,
        )
        running = GaugeMetricFamily(
            "sidetrace_component_running", "1 for each component that is running.", labels=["component"]
        )
        for name, component in self._components.items():
            running.add_metric([name], 1 if component.status()["state"] == "running" else 0)
        yield running
