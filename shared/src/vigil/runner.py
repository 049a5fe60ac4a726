"""Process plumbing shared by the services' ``__main__``: settings, logging, signals.

A first SIGTERM/SIGINT asks the service to shut down gracefully (``shutdown()``); a second
one exits at once. A settings error prints one clear line and exits with status 2.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog

from vigil import logs, settings
from vigil.errors import SettingsError, VigilError
from vigil.settings import CommonSettings

S = TypeVar("S", bound=CommonSettings)


class Service(Protocol):
    async def run(self) -> None: ...

    async def shutdown(self) -> None: ...


def main(name: str, settings_cls: type[S], factory: Callable[[S], Service]) -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(f"usage: {name}\n\nConfigured only by environment variables:\n")
        for var, default, typ, doc in settings.describe(settings_cls):
            print(f"  {var}  ({typ}, default: {default or 'none'})")
            if doc:
                print(f"      {doc}")
        return
    try:
        conf = settings.load(settings_cls)
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.setup(name, conf.log_level, conf.log_format)
    log = structlog.get_logger(name)
    try:
        asyncio.run(_serve(factory(conf), log))
    except VigilError as exc:
        log.error("fatal", error=str(exc))
        raise SystemExit(1) from None


async def _serve(service: Service, log: structlog.stdlib.BoundLogger) -> None:
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(sig: signal.Signals) -> None:
        if stopping:
            log.warning("second_signal_exiting_now", signal=sig.name)
            raise SystemExit(130)
        log.info("shutdown_requested", signal=sig.name)
        stopping.append(asyncio.create_task(service.shutdown()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await service.run()
    for task in stopping:
        await task
