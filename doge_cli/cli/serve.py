"""``doge serve``: the model behind an OpenAI-compatible API and a web chat page (doge_cli.serve)."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Annotated

import typer

from doge_cli.cli.options import DtypeOpt, QuantizeOpt
from doge_cli.errors import DogeError


def serve(
    model: Annotated[str, typer.Argument(help="Model folder (e.g. runs/sft/final) or hub id (owner/name).",
                                         show_default=False)],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")] = 8000,
    served_name: Annotated[str | None, typer.Option(
        "--served-name", help="The model's name in the API (default: the model folder's name, or the hub id); "
        "it is public, as is the chat page's.")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="DOGE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (also read from "
        "DOGE_API_KEY).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests generated at once; more are queued.")] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests that may wait beyond --max-batch; more are answered 429 with Retry-After.")]
    = 64,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", help="Open client connections served at once; a request on one more is answered 503 "
        "(by uvicorn) until one closes.")] = 256,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Longest reply a request may ask for (max_tokens).")] = 1024,
    no_ui: Annotated[bool, typer.Option("--no-ui", help="Serve the API only, no chat page at /.")] = False,
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", help="Tokenizer folder or hub id (default: the one in the model folder).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    compile_step: Annotated[bool, typer.Option(
        "--compile", help="CPU: decode through the torch.compile'd step (1.6-2.3x faster at Doge-20M; the first "
        "requests of each batch size wait while it compiles, 10-45 s).")] = False,
) -> None:
    """Serve a model with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models, /health) and a
    chat page at /. Concurrent requests are batched, up to --max-batch at once."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise DogeError(f"doge serve needs FastAPI and uvicorn ({err.name} is missing); install them with: "
                        "pip install 'doge-cli[serve]'") from err
    if max_batch < 1:
        raise DogeError("--max-batch must be at least 1")
    if max_queue < 0:
        raise DogeError("--max-queue must be 0 or more")
    if max_new_tokens < 1:
        raise DogeError("--max-new-tokens must be at least 1")
    if max_connections < 1:
        raise DogeError("--max-connections must be at least 1")
    if not 0 <= port <= 65535:
        raise DogeError(f"--port {port} is not a port; choose 0..65535")
    if api_key is not None and not api_key.strip():
        raise DogeError("--api-key is empty; pass a key or leave the option out")

    from doge_cli.chat.loading import check_precision, load_model_and_tokenizer
    from doge_cli.inference import Engine
    from doge_cli.serve.app import create_app
    from doge_cli.serve.worker import EngineWorker

    check_precision(dtype, quantize, device)
    sock = _bind(host, port)  # before loading the model: a taken port is found at once
    try:
        lm, tok = load_model_and_tokenizer(model, tokenizer=tokenizer, device=device, dtype=dtype, quantize=quantize)
    except BaseException:
        sock.close()
        raise
    if max_new_tokens >= lm.config.max_position_embeddings:
        max_new_tokens = lm.config.max_position_embeddings - 1
        print(f"doge serve: --max-new-tokens lowered to {max_new_tokens} (the model's context is "
              f"{lm.config.max_position_embeddings} tokens)", file=sys.stderr)
    if not tok.chat_template:
        print("doge serve: this tokenizer has no chat template, so /v1/chat/completions and the chat page will "
              "refuse messages; /v1/completions works", file=sys.stderr)
    if compile_step and lm.device.type != "cpu":
        sock.close()
        raise DogeError("--compile is for decoding on a CPU; on a GPU the step already runs as CUDA graphs")
    worker = EngineWorker(lambda: Engine(lm, tok, max_batch=max_batch, compile=compile_step))
    if served_name is None:  # a folder's own name, never the path (a home folder, a user name) it was given as
        from pathlib import Path

        folder = Path(model).expanduser()
        served_name = folder.resolve().name if folder.is_dir() else model
    app = create_app(lm, tok, served_name=served_name, api_key=api_key, max_batch=max_batch,
                     max_new_tokens=max_new_tokens, ui=not no_ui, worker=worker, max_queue=max_queue)

    # asyncio warns "socket.send() raised exception." when a response is still being written to a client
    # that has gone away; the request's own log line already says so ("cancelled: the client went away").
    logging.getLogger("asyncio").addFilter(_GoneClientFilter())
    log = logging.getLogger("doge")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    server = uvicorn.Server(server_config(app, max_connections))
    _run(server, sock, worker, announce=lambda: print(
        f"doge serve: {served_name} at http://{shown}:{bound_port}{'/' if not no_ui else '/v1'} "
        "(Ctrl+C stops)", flush=True))


def server_config(app, max_connections: int):
    """uvicorn's settings for ``doge serve``: our own access log, 5 s to finish answers at shutdown, and at most
    ``max_connections`` open connections served (uvicorn answers 503 on one more: its limit counts the
    connection asking too, hence the + 1)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                          limit_concurrency=max_connections + 1)


def _run(server, sock: socket.socket, worker, announce) -> None:
    """The HTTP server on a thread, the engine's loop on this (main) thread: torch's CPU kernels run a
    decoding step about twice as fast here (doge_cli.serve.worker). Ctrl+C or SIGTERM stop both;
    ``announce`` prints the URL once they would."""
    import signal
    import threading

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            worker.stop()  # the server ended on its own (e.g. it failed to start): the loop must end too

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)  # off the main thread uvicorn installs no handlers
    thread = threading.Thread(target=http, name="doge-http", daemon=True)
    stopped = False
    try:
        announce()
        thread.start()
        worker.run()
    except KeyboardInterrupt:
        stopped = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        worker.close("the server is shutting down")
        server.should_exit = True
        if thread.ident is not None:  # a signal can come between the URL's print and the thread's start
            thread.join(timeout=15)
        sock.close()
    if not stopped and not server.started:
        raise DogeError("the HTTP server stopped before it started; see the messages above")


class _GoneClientFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "socket.send() raised exception."


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; DogeError with the reason when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise DogeError(f"--host {host!r} is not an address this machine can listen on ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        hint = "pick another with --port (0: any free port)" if err.errno in (98, 48) else "check --host and --port"
        raise DogeError(f"cannot listen on {host}:{port}: {err.strerror}; {hint}") from err
    return sock
