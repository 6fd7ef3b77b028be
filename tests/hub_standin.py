"""A stand-in for the Hugging Face hub's HTTP API, for push tests without a network: it answers what
``huggingface_hub`` asks when it creates a repo or branch and commits a folder (every file sent inline),
and records it. A repo named ``REFUSED`` is refused with 403."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

REFUSED = "me/forbidden"


def _app(state: dict) -> FastAPI:
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def route(path: str, request: Request):
        body = await request.body()
        state.setdefault("calls", []).append((request.method, "/" + path))
        base = str(request.base_url).rstrip("/")
        if path == "api/repos/create":
            data = json.loads(body)
            if f"{data.get('organization')}/{data['name']}" == REFUSED:
                return JSONResponse({"error": "You don't have the rights to create a model under this namespace"},
                                    status_code=403)
            state["create"] = data
            state["token"] = request.headers.get("authorization")
            return {"url": f"{base}/{data.get('organization')}/{data['name']}"}
        if path == "api/validate-yaml":
            return {"errors": [], "warnings": []}
        if path.startswith("api/models/") and "/branch/" in path:
            state["branch"] = path.rsplit("/", 1)[1]
            return {}
        if path.startswith("api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if path.startswith("api/models/") and "/commit/" in path:
            commit = {"path": path, "files": {}}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    commit["summary"] = item["value"].get("summary")
                elif item["key"] == "file":
                    commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            state.setdefault("commits", []).append(commit)
            parts = path.split("/")
            return {"commitUrl": f"{base}/{parts[2]}/{parts[3]}/commit/{'a' * 40}", "commitOid": "a" * 40}
        return JSONResponse({"error": f"not in the stand-in: {request.method} /{path}"}, status_code=404)

    return app


@contextlib.contextmanager
def standin_hub():
    """(endpoint URL, state dict) while the stand-in runs on a free local port."""
    import uvicorn

    state: dict = {}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
