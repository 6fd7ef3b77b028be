"""The engine's loop, fed by the server's request handlers.

The engine is not thread-safe, so one thread owns it: handlers hand it requests through a queue, and it
admits them between decoding steps (continuous batching up to the engine's ``max_batch``). Text deltas
and the end of each request travel back to the handler's asyncio loop with ``call_soon_threadsafe``.
One request's failure is kept to it where the engine can tell whose it is: a request the engine refuses,
or whose prefill fails (``Request.error``), gets an error and the others go on in the same engine. A
decoding step that raises involves every running row: it fails the requests it was running and the loop
goes on with a fresh engine, so no request stops the server. Clients get an error id; the log line with
that id names the requests and holds the traceback.

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

    def load(self) -> dict[str, int]:
        """Requests in engine rows and requests waiting for one (read from any thread; a snapshot)."""
        engine = self.engine
        return {"generating": len(engine.running), "queued": len(engine.queue) + self.inbox.qsize()}

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
            except Exception as err:  # a bug must not take the server down: fail what was running, go on
                names = [ticket.request.id or "-" for ticket in self.tickets.values()]
                self._fail_running(_failed(err, "generation step failed for requests " + ", ".join(names)))
                self.engine = self.make_engine()
                continue
            for request in finished:
                ticket = self.tickets.pop(id(request), None)
                if ticket is None:
                    continue
                if request.error is not None:  # this request's own failure; the others went on
                    ticket._put(("error", _failed(request.error, f"request {request.id or '-'} failed to start")))
                else:
                    ticket._put(("done", None))


def _failed(err: BaseException, what: str) -> str:
    """Log ``what`` with ``err``'s traceback under a new error id; the client's message names only the id
    (never the internals)."""
    error_id = secrets.token_hex(4)
    logger.error("%s [error %s]", what, error_id, exc_info=err)
    return f"generation failed (error {error_id}; the server's log has the details)"
