"""ASGI middlewares of ``nasforge serve``: request checks before queueing, and non-2xx counts.

Both run in LitServe's HTTP process. :class:`RequestValidator` owns the reading and checking of
``POST /predict`` bodies (:mod:`nasforge.serve.validation`), so LitServe only ever parses a
body that is valid JSON of the right shape, labelled ``application/json``: its own fallback to
form parsing for other content types never runs. :class:`StatusCounter` sits outside it and
counts every response that is not 2xx, whoever produced it (the validator, FastAPI's 404/405,
an error from the inference worker, or an exception the framework turns into a 500).
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nasforge.serve.metrics import StatusCounts
from nasforge.serve.validation import (
    JSON_WHITESPACE,
    BadRequest,
    RequestRules,
    check_body,
    check_content_type,
)

# Bodies larger than this are checked in a worker thread.
_THREAD_ABOVE_BYTES = 256 * 1024


async def _answer(send: Send, bad: BadRequest) -> None:
    body = json.dumps({"error": bad.message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": bad.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class StatusCounter:
    """ASGI middleware counting every non-2xx HTTP response by status code.

    Args:
        app: The wrapped ASGI app.
        counts: Shared counters (read by ``/metrics``).
    """

    def __init__(self, app: ASGIApp, counts: StatusCounts) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not 200 <= message["status"] < 300:
                    self.counts.add(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            # Starlette's outermost ServerErrorMiddleware answers 500 for an escaped exception.
            if not started:
                self.counts.add(500)
            raise


class RequestValidator:
    """ASGI middleware that reads, checks and stamps ``POST /predict`` bodies.

    A bad body is answered at once with ``{"error": "..."}`` and its 4xx status; a good one is
    passed on as ``application/json`` with its arrival time added (``"_arrival"``, for the
    server-side latency the switching policy watches).

    Args:
        app: The wrapped ASGI app.
        rules: Shape, item limit and dtype of a valid request.
        max_body_bytes: Larger bodies get 413 (checked while reading, before parsing).
    """

    def __init__(self, app: ASGIApp, rules: RequestRules, max_body_bytes: int) -> None:
        self.app = app
        self.rules = rules
        self.max_body_bytes = max_body_bytes

    async def _read(self, scope: Scope, receive: Receive) -> bytes | BadRequest | None:
        """The whole body, a 413 as soon as it is over the limit, ``None`` on disconnect."""
        too_big = BadRequest(413, f"body over {self.max_body_bytes} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_big
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_big
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
        bad = check_content_type(dict(scope.get("headers", [])).get(b"content-type"))
        body = b""
        if bad is None:
            read = await self._read(scope, receive)
            if read is None:  # the client went away
                return
            if isinstance(read, BadRequest):
                bad = read
            elif len(read) > _THREAD_ABOVE_BYTES:
                # Parsing megabytes takes a while: off the event loop, so small requests
                # keep flowing meanwhile (the loop gets the GIL at each switch interval).
                body, bad = read, await run_in_threadpool(check_body, read, self.rules)
            else:
                body, bad = read, check_body(read, self.rules)
        if bad is not None:
            await _answer(send, bad)
            return
        # The body is a JSON object holding only "inputs": drop its closing brace and add the
        # arrival time as a second key.
        stamped = body.rstrip(JSON_WHITESPACE)[:-1] + f', "_arrival": {time.time():.6f}}}'.encode()
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": stamped, "more_body": False}

        scope = dict(scope)
        scope["headers"] = [
            *((k, v) for k, v in headers if k != b"content-length"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(stamped)).encode()),
        ]
        await self.app(scope, replay, send)


def request_gate(
    app: ASGIApp, rules: RequestRules, max_body_bytes: int, counts: StatusCounts
) -> ASGIApp:
    """The validator wrapped by the counter, as one middleware factory for LitServe.

    Composed here rather than listed as two LitServe middlewares, whose order Starlette
    reverses, so the counter is certain to see the validator's answers.
    """
    return StatusCounter(RequestValidator(app, rules, max_body_bytes), counts)
