"""Network faults for the multi-host tests: a TCP proxy on 127.0.0.1 that a test can cut, heal and re-point.

Each simulated host reaches PostgreSQL (and, where a test wants, the agent and WATI) through its own proxy, so a
test can partition one host while the others keep working:

- `blackhole()`: nothing is forwarded any more, in either direction, on open or new connections. Connections
  stay open (no FIN, no RST) and new ones are accepted and held: what a host sees when a link silently drops
  every packet. Bytes sent meanwhile are held, not dropped.
- `reset()`: every connection, open or new, is closed at once (a host that is up but refuses: RST/FIN).
- `heal()`: forwarding resumes (and `reset` ends); held bytes are delivered late, as TCP retransmission would deliver them after a
  short partition. That is what lets a test prove that a partitioned host's stale writes are refused.
- `retarget(port)`: new connections go to another server and open ones are closed (a virtual IP or DNS name
  moved to a promoted standby).

The proxy runs its own asyncio loop in a daemon thread; the methods are called from the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port` until told otherwise."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-proxy")
        self.connections = 0  # accepted so far, for tests' reports
        self._refusing = False
        self.held_bytes = 0  # read while cut and delivered after the heal
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]

    # -- control, from the test's thread --

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, database_url: str) -> str:
        """`database_url` (or any http URL) with its host:port replaced by this proxy's."""
        scheme, _, rest = database_url.partition("://")
        authority, slash, path = rest.partition("/")
        user, at, _hostport = authority.rpartition("@")
        return f"{scheme}://{user}{at}127.0.0.1:{self.port}{slash}{path}"

    def blackhole(self) -> None:
        """Stop forwarding anything; keep every connection open and accept (and hold) new ones."""
        self._loop.call_soon_threadsafe(self._event().clear)

    def heal(self) -> None:
        """Forward again, delivering what was held."""
        self._refusing = False
        self._loop.call_soon_threadsafe(self._event().set)

    def reset(self) -> None:
        """Close every open connection and each new one at once, until healed."""
        self._refusing = True
        self.drop_connections()

    def retarget(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        """Send new connections to another server and close the open ones."""
        self.target = (target_host, target_port)
        self.drop_connections()

    def drop_connections(self) -> None:
        """Close every open connection (both sides see the connection end)."""
        self._call(self._drop())

    # -- the loop's side --

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def _event(self) -> asyncio.Event:
        assert self._open is not None, "proxy not started"
        return self._open

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, backlog=512)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop()

    async def _drop(self) -> None:
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refusing:
            client_writer.close()
            return
        self._writers.add(client_writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._event().wait()  # a blackhole holds new connections too
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the target is down: the client sees its connection closed, as with a refused connect
            self._writers.add(upstream_writer)
            try:
                await asyncio.gather(self._pump(client_reader, upstream_writer),
                                     self._pump(upstream_reader, client_writer))
            finally:
                upstream_writer.close()
                self._writers.discard(upstream_writer)
        except asyncio.CancelledError:
            pass
        finally:
            client_writer.close()
            self._writers.discard(client_writer)
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_ = self._event()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    await open_.wait()  # a close crosses a cut link only once it heals
                    break
                if not open_.is_set():  # cut while reading: hold the bytes until healed
                    self.held_bytes += len(data)
                    await open_.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
