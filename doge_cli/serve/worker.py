"""The engine's loop, fed by the server's request handlers.

The engine is not thread-safe, so one thread owns it: handlers hand it requests through a queue, and it
admits them between decoding steps (continuous batching up to the engine's ``max_batch``). Text deltas
and the end of each request travel back to the handler's asyncio loop with ``call_soon_threadsafe``. A
step that raises fails the requests it was running (their clients get an error) and the loop goes on
with a fresh engine, so one bad request never stops the server.

``doge serve`` runs the loop on the process's main thread (:meth:`EngineWorker.run`) and the HTTP server
on a second one. Measured on a 2-core CPU, torch's CPU kernels ran a decoding step about half as fast
on a secondary thread as on the main one (Doge-20M, batch 1: 60-80 against 130-165 new tokens/s), while
the asyncio loop costs next to nothing wherever it runs (benchmarks/RESULTS.md). :meth:`start` runs
the loop on a thread of its own instead, for embedding and tests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
from collections.abc import Callable

from doge_cli.inference import Engine, Request

logger = logging.getLogger(__name__)


class Ticket:
    """One request's way back to its handler: ``events`` receives ``("text", delta)`` items, then
    ``("done", None)`` or ``("error", message)``."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        request.on_text = lambda delta: self._put(("text", delta))

    def _put(self, item) -> None:
        if self.loop.is_closed():  # the server has shut down: nobody is left to read this request's events
            return
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineWorker:
    def __init__(self, make_engine: Callable[[], Engine]):
        self.make_engine = make_engine
        self.engine = make_engine()
        self.inbox: queue.Queue = queue.Queue()
        self.tickets: dict[int, Ticket] = {}
        self.thread: threading.Thread | None = None
        self.closed: str | None = None  # why the loop has ended for good, once it has
        self._closing = threading.Lock()

    def submit(self, ticket: Ticket) -> None:
        with self._closing:
            if self.closed is None:
                self.inbox.put(ticket)
                return
        ticket._put(("error", self.closed))

    def start(self) -> EngineWorker:
        """Run the loop on a background thread (``stop`` ends it)."""
        self.thread = threading.Thread(target=self.run, name="doge-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """End the loop after the step it is in; waits for its thread when :meth:`start` made one."""
        self.inbox.put(None)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def _fail_running(self, message: str) -> None:
        for ticket in self.tickets.values():
            ticket._put(("error", message))
        self.tickets.clear()

    def close(self, message: str) -> None:
        """At shutdown, once the loop has returned: every request running, queued or still to come ends
        with ``message``, so no client is left waiting."""
        with self._closing:
            self.closed = message
        self._fail_running(message)
        while True:
            try:
                ticket = self.inbox.get_nowait()
            except queue.Empty:
                return
            if ticket is not None:
                ticket._put(("error", message))

    def run(self) -> None:
        """The loop, in the calling thread, until :meth:`stop`."""
        while True:
            waiting = [self.inbox.get()] if self.engine.idle() else []  # sleep until there is work
            while True:
                try:
                    waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if None in waiting:
                # Requests that arrived with the stop go back to the inbox, where close() ends them with its
                # message (dropped here, their clients waited until the connection timed out).
                for ticket in waiting:
                    if ticket is not None:
                        self.inbox.put(ticket)
                return
            for ticket in waiting:
                try:
                    self.engine.submit(ticket.request)
                except Exception as err:  # the handler checked the request; whatever is left is its error
                    ticket._put(("error", f"{type(err).__name__}: {err}"))
                    continue
                self.tickets[id(ticket.request)] = ticket
            try:
                finished = self.engine.step()
            except Exception:  # a bug must not take the server down: fail what was running, go on
                # Clients get an error id, the log gets the details (never the internals in a response).
                error_id = secrets.token_hex(4)
                logger.exception("generation step failed [error %s]", error_id)
                self._fail_running(f"generation failed (error {error_id}; the server's log has the details)")
                self.engine = self.make_engine()
                continue
            for request in finished:
                ticket = self.tickets.pop(id(request), None)
                if ticket is not None:
                    ticket._put(("done", None))
