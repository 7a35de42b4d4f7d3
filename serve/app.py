"""The FastAPI application: OpenAI's completions and chat completions over one engine.

Each request is checked (`protocol.py`; a bad one is a 400 naming its field), given an
id and handed to the engine thread (`engine_loop.py`; a full server is a 503). Its
outputs come back on its own queue: a non-streaming request waits for the last one, a
streaming one sends each new piece of text as a server-sent event (`data: {...}`, then
`data: [DONE]`). If the client goes away first, the request is aborted and its KV blocks
freed. `GET /v1/models` names the one model, `GET /health` answers 200 while the engine
thread runs, `GET /metrics` gives the numbers of `metrics.py`.

Introduced after M7 (issue 25).
"""

from __future__ import annotations

import itertools
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine_loop import EngineLoop, Overloaded
from .metrics import Metrics, RequestClock
from .protocol import (ApiError, Choices, Parsed, chat_logprobs, completion_logprobs,
                       created, finish_reason, parse_chat, parse_completion,
                       sampling_fields, usage)


def build_app(loop: EngineLoop, served_model: str, sampling_params_class) -> FastAPI:
    app = FastAPI(title="FoloVLLM", docs_url=None, redoc_url=None)
    fields = sampling_fields(sampling_params_class)
    tokenizer = loop.engine.tokenizer
    ids = itertools.count()
    metrics = Metrics()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health():
        if not loop.thread.is_alive():
            raise ApiError(503, "the engine thread has stopped", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(loop.snapshot, loop.open_requests),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": served_model, "object": "model", "created": created(),
            "owned_by": "folovllm", "max_model_len": loop.engine.config.max_model_len,
            "vocab_size": loop.engine.vocab_size}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = parse_completion(await _json(request), served_model, fields)
        return await _answer(parsed, parsed.prompt, "cmpl", "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        parsed = parse_chat(await _json(request), served_model, fields)
        try:
            text = tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True,
                                                 tokenize=False)
        except (ValueError, TypeError) as exc:  # e.g. a tokenizer without a chat template
            raise ApiError(400, f"messages: the model's chat template cannot take them: "
                                f"{exc}", "messages") from None
        prompt = tokenizer.encode(text, add_special_tokens=False)
        return await _answer(parsed, prompt, "chatcmpl", "chat.completion")

    async def _answer(parsed: Parsed, prompt, prefix: str, kind: str):
        request_id = f"{prefix}-{next(ids)}"
        try:
            params = sampling_params_class(**parsed.sampling)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), _field_of(exc)) from None
        clock = metrics.clock()
        try:
            outputs = loop.add(request_id, prompt, params)
        except Overloaded as exc:
            raise ApiError(503, str(exc), kind="server_overloaded") from None
        chat = kind == "chat.completion"
        if parsed.stream:
            first = await _next(outputs, request_id, clock)  # a refused prompt: still a 400
            events = _events(outputs, first, parsed, request_id, chat, clock)
            return StreamingResponse(events, media_type="text/event-stream")
        final = None
        try:
            final = await _last(outputs, clock)
        finally:
            loop.release(request_id, finished=True)
            clock.end(final, "error" if final is None else _reason(final))
        return _body(final, parsed, request_id, chat)

    async def _next(outputs, request_id: str, clock: RequestClock):
        item = await outputs.get()
        if isinstance(item, Exception):
            loop.release(request_id, finished=True)
            clock.end(None, "error")
            _raise(item)
        clock.output()
        return item

    async def _last(outputs, clock: RequestClock):
        final = None
        while (item := await outputs.get()) is not None:
            if isinstance(item, Exception):
                _raise(item)
            clock.output()
            final = item
        return final

    async def _events(outputs, first, parsed: Parsed, request_id: str, chat: bool,
                      clock: RequestClock):
        """The server-sent events of one streaming request; aborts it if the client
        leaves (the response's task is cancelled) before it finished."""
        choices, finished, sent_role, last = Choices(), False, False, first
        reason = "abort"  # until it ends otherwise: its client left
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            item = first
            while item is not None:
                if isinstance(item, Exception):
                    finished, reason = True, "error"
                    yield _sse(ApiError(500, str(item), kind="server_error").body())
                    break
                last = item
                pieces = []
                for completion, text, positions in choices.deltas(item):
                    piece = dict(index=completion.index, finish_reason=finish_reason(completion))
                    logprobs = None
                    if parsed.logprobs is not None and len(positions):
                        logprobs = (chat_logprobs(tokenizer, completion, positions,
                                                  parsed.logprobs) if chat else
                                    completion_logprobs(tokenizer, completion, positions))
                    if chat:
                        delta = {"content": text}
                        if not sent_role:
                            delta["role"] = "assistant"
                        piece.update(delta=delta, logprobs=logprobs)
                    else:
                        piece.update(text=text, logprobs=logprobs)
                    pieces.append(piece)
                sent_role = sent_role or (chat and bool(pieces))
                if pieces:
                    yield _sse(dict(id=request_id, object=kind, created=created(),
                                    model=served_model, choices=pieces))
                if item.finished:
                    finished, reason = True, _reason(item)
                    if parsed.include_usage:
                        yield _sse(dict(id=request_id, object=kind, created=created(),
                                        model=served_model, choices=[], usage=usage(item)))
                item = await outputs.get()
                if item is not None and not isinstance(item, Exception):
                    clock.output()
            yield "data: [DONE]\n\n"
        finally:
            loop.release(request_id, finished)
            clock.end(last, reason)

    def _body(final, parsed: Parsed, request_id: str, chat: bool) -> dict:
        choices = []
        for completion in final.outputs:
            positions = range(len(completion.token_ids))
            logprobs = None
            if parsed.logprobs is not None:
                logprobs = (chat_logprobs(tokenizer, completion, positions, parsed.logprobs)
                            if chat else completion_logprobs(tokenizer, completion, positions))
            choice = dict(index=completion.index, logprobs=logprobs,
                          finish_reason=finish_reason(completion))
            if chat:
                choice["message"] = {"role": "assistant", "content": completion.text}
            else:
                choice["text"] = completion.text
            choices.append(choice)
        return dict(id=request_id, object="chat.completion" if chat else "text_completion",
                    created=created(), model=served_model, choices=choices,
                    usage=usage(final))

    return app


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def _reason(output) -> str:
    """How a finished request ended, for /metrics: "stop" or "length" (of its first
    choice)."""
    return finish_reason(output.outputs[0]) or "stop"


def _field_of(exc: Exception) -> str | None:
    """The field an engine's error names: its messages start with `name: ...`."""
    head = str(exc).split(":", 1)[0]
    return head if head.isidentifier() else None


def _raise(exc: Exception):
    if isinstance(exc, ValueError):  # the engine refused the request
        raise ApiError(400, str(exc), _field_of(exc))
    raise ApiError(500, str(exc), kind="server_error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
