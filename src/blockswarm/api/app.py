"""The HTTP side: OpenAI's routes and the swarm page, on Starlette (served by uvicorn).

Starlette rather than FastAPI: the bodies are checked by our own pydantic models so that every
mistake is a 400 in OpenAI's shape naming its field (FastAPI answers 422 in its own shape), and
nothing else of FastAPI is needed. Streams are server-sent events, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from importlib import resources
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from blockswarm.api.engine import Choice, Engine, Event, derived_seed
from blockswarm.api.errors import APIError
from blockswarm.api.schema import ChatRequest, CompletionRequest, parse
from blockswarm.api.swarmstate import SwarmState
from blockswarm.model.sampling import SamplingParams

log = logging.getLogger("blockswarm.api")
DEFAULT_MAX_TOKENS = 256  # when a request names no limit (and the context leaves room for it)
MAX_REQUEST_BYTES = 1 << 20
KEEPALIVE_S = 15.0  # a comment on idle event streams, so proxies keep them open
BODY_TIMEOUT_S = 30.0  # the longest a request's body may take to arrive


class EventStream(Response):
    """Server-sent events that call `on_close` however the response ends: finished, failed, or the
    client gone. Starlette's StreamingResponse would do, but it runs every stream in an anyio task
    group that costs ~0.5 ms before the first byte here; this sends straight away and hears a
    disconnect from a plain task beside it."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], headers=None):
        self.body_iterator, self.on_close = content, on_close
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", **(headers or {})})

    async def __call__(self, scope, receive, send):
        # on a disconnect the producers stop at their next token, which ends the iteration below
        listener = asyncio.create_task(until_disconnect(receive, self.on_close))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for text in self.body_iterator:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            listener.cancel()
            self.on_close()


async def until_disconnect(receive, on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client goes away (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    on_disconnect()


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def build_app(engine: Engine, state: SwarmState, api_keys: set[str] | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES, default_max_tokens: int = DEFAULT_MAX_TOKENS,
              body_timeout_s: float = BODY_TIMEOUT_S) -> "Generations":
    created = int(time.time())

    def authorize(request: Request) -> None:
        if not api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip(), k) for k in api_keys):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    async def body_of(request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to pass the bound: by its declared length,
        or while it streams in without one."""
        too_large = APIError(413, f"the request is larger than {max_request_bytes} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise too_large
        body = bytearray()
        try:
            async with asyncio.timeout(body_timeout_s):  # a body sent a byte at a time holds nothing for long
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > max_request_bytes:
                        raise too_large
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {body_timeout_s:g} s",
                           code="request_timeout") from None
        return bytes(body)

    def check_model(name: str) -> None:
        if name != engine.name:
            raise APIError(404, f"the model {name!r} does not exist here; this API serves {engine.name!r}",
                           param="model", code="model_not_found")

    def token_budget(prompt: list[int], asked: int | None, param: str) -> int:
        context = engine.context_length
        if len(prompt) >= context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the model's context is {context} tokens, "
                                "which must also hold the answer", param=param, code="context_length_exceeded")
        if asked is not None and len(prompt) + asked > context:
            raise APIError(400, f"the model's context is {context} tokens; you asked for {len(prompt) + asked} "
                                f"({len(prompt)} in the prompt, {asked} to generate)", param="max_tokens",
                           code="context_length_exceeded")
        return asked if asked is not None else min(default_max_tokens, context - len(prompt))

    def choices_for(prompts: list[list[int]], req, param: str) -> list[Choice]:
        choices = []
        for p, prompt in enumerate(prompts):
            budget = token_budget(prompt, req.token_limit, param)
            for j in range(req.n):
                sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=derived_seed(req.seed, j))
                choices.append(Choice(p * req.n + j, prompt, budget, sampling, req.stop))
        return choices

    async def generate(choices: list[Choice], prompt_tokens: int, rid: str, kind: str, req, receive) -> Response:
        cancelled = threading.Event()
        events = engine.run(choices, cancelled)
        try:
            first = await anext(events)
        except BaseException:
            cancelled.set()
            raise
        if first.error is not None:
            cancelled.set()
            await events.aclose()
            raise first.error
        head = {"id": rid, "created": int(time.time()), "model": engine.name}
        if req.stream:
            return EventStream(_chunks(first, events, head, kind, choices, prompt_tokens, req.include_usage),
                               cancelled.set, headers={"X-Request-Id": rid})
        texts, finishes, tokens = {c.index: [] for c in choices}, {}, {}
        # a client that gives up (an SDK's timeout, which it then retries) stops the generation too
        listener = asyncio.create_task(until_disconnect(receive, cancelled.set))
        try:
            event = first
            while True:
                if event.error is not None:
                    raise event.error
                _collect(event, texts, finishes, tokens)
                event = await anext(events, None)
                if event is None:
                    break
        finally:
            listener.cancel()
            cancelled.set()
            await events.aclose()
        usage = _usage(prompt_tokens, sum(tokens.values()))
        if kind == "chat":
            out = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                    "logprobs": None, "finish_reason": finishes[i]} for i in sorted(texts)]
            return JSONResponse({**head, "object": "chat.completion", "choices": out, "usage": usage,
                                 "system_fingerprint": None}, headers={"X-Request-Id": rid})
        out = [{"index": i, "text": "".join(texts[i]), "logprobs": None, "finish_reason": finishes[i]}
               for i in sorted(texts)]
        return JSONResponse({**head, "object": "text_completion", "choices": out, "usage": usage},
                            headers={"X-Request-Id": rid})

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse(ChatRequest, await body_of(request))
        check_model(req.model)
        prompt = await engine.encode_chat([m.as_template_input() for m in req.messages])
        choices = choices_for([prompt], req, "messages")
        return await generate(choices, len(prompt), f"chatcmpl-{secrets.token_hex(12)}", "chat", req,
                              request.receive)

    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse(CompletionRequest, await body_of(request))
        check_model(req.model)
        if isinstance(req.prompt, str):
            prompts = [await engine.encode_text(req.prompt)]
        elif all(isinstance(x, int) for x in req.prompt):
            vocab = engine.model.head.config.vocab_size
            if any(not 0 <= x < vocab for x in req.prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
            prompts = [list(req.prompt)]
        else:
            prompts = [await engine.encode_text(text) for text in req.prompt]
        if any(not prompt for prompt in prompts):
            raise APIError(400, "prompt: the prompt is empty", param="prompt", code="invalid_value")
        choices = choices_for(prompts, req, "prompt")
        return await generate(choices, sum(map(len, prompts)), f"cmpl-{secrets.token_hex(12)}", "text", req,
                              request.receive)

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "blockswarm",
                "context_length": engine.context_length}

    async def list_models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        authorize(request)
        check_model(request.path_params["model"])
        return JSONResponse(model_card())

    async def swarm(request: Request) -> Response:
        authorize(request)
        return JSONResponse(state.snapshot())

    async def swarm_events(request: Request) -> Response:
        authorize(request)
        stop = threading.Event()

        async def updates():
            seen, quiet = -1, time.monotonic()
            while not stop.is_set():
                if state.version != seen or time.monotonic() - quiet > KEEPALIVE_S:
                    seen, quiet = state.version, time.monotonic()
                    yield sse(state.snapshot())
                await asyncio.sleep(0.25)

        return EventStream(updates(), stop.set)

    page_html = resources.files("blockswarm.api").joinpath("static/index.html").read_text()  # (read once)

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html)

    def error_response(request: Request, exc: Exception) -> Response:
        if isinstance(exc, APIError):
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error",
                                     code="internal_error").body(), status_code=500)

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(request, exc)

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such route; the API serves /v1/models, /v1/chat/completions and /v1/completions" \
            if status == 404 else f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(APIError(status, message, code="not_found" if status == 404 else "method_not_allowed")
                            .body(), status_code=status)

    routes = [
        Route("/", page), Route("/api/swarm", swarm), Route("/api/swarm/events", swarm_events),
        Route("/v1/models", list_models), Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    rest = Starlette(routes=routes, exception_handlers={APIError: on_error, 404: not_found, 405: not_found,
                                                        Exception: on_error})
    return Generations({"/v1/chat/completions": chat_completions, "/v1/completions": completions}, rest,
                       error_response)


class Generations:
    """The ASGI app: POSTs to the generation routes go straight to their handlers, everything else
    (and those routes with another method) through Starlette. On the way to a first token every
    layer counts, several times over in a process that has just woken from idle: Starlette's two
    middlewares and its router cost ~8 us a request here hot, 0.04-0.07 ms between a request's
    arrival and its handler in the benchmark. Errors are answered as Starlette's handlers answer
    them on the other routes."""

    def __init__(self, handlers: dict[str, Callable], rest: Starlette,
                 error_response: Callable[[Request, Exception], Response]):
        self.handlers, self.rest, self.error_response = handlers, rest, error_response

    async def __call__(self, scope, receive, send):
        handler = self.handlers.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            return await self.rest(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except ClientDisconnect:  # gone before its request was read: nobody to answer
            return
        except Exception as exc:
            response = self.error_response(request, exc)
        await response(scope, receive, send)


def _collect(event: Event, texts: dict, finishes: dict, tokens: dict) -> None:
    if event.text:
        texts[event.index].append(event.text)
    if event.finish is not None:
        finishes[event.index], tokens[event.index] = event.finish, event.tokens


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _chunks(first: Event, events, head: dict, kind: str, choices: list[Choice], prompt_tokens: int,
                  include_usage: bool):
    """The stream's events as OpenAI sends them: per choice a first chunk (chat: the role), the
    text as it comes, a last chunk with the finish reason; usage if asked; then [DONE]."""
    chat = kind == "chat"
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        head["system_fingerprint"] = None

    def chunk(index: int, text: str | None = None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            body = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            body = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [body]})

    # the roles go out with the first text, in one write: each write here costs a wake-up on both sides
    opening = "".join(chunk(choice.index, role=True) for choice in choices) if chat else ""
    generated = 0
    event = first
    try:
        while event is not None:
            if event.error is not None:
                yield opening + sse(event.error.body())
                return
            out = opening + (chunk(event.index, text=event.text) if event.text else "")
            opening = ""
            if event.finish is not None:
                generated += event.tokens
                out += chunk(event.index, finish=event.finish)
            if out:
                yield out
            event = await anext(events, None)
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(prompt_tokens, generated)})
        yield sse("[DONE]")
    finally:
        await events.aclose()
