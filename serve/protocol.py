"""OpenAI's request and response bodies, for completions and chat completions.

`parse_completion` / `parse_chat` check a request body field by field (a wrong type or
value is an `ApiError` naming the field, answered 400) and give the prompt and the
stage's `SamplingParams` arguments; `Choices` keeps what each choice has already sent,
so a stream sends only the new text; the `*_body` / `*_chunk` functions build the
responses from the engine's `RequestOutput`s.

Introduced after M7 (issue 25).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error answered with OpenAI's error body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


@dataclass
class Parsed:
    """A checked request: the prompt (text or token ids, or chat messages), the sampling
    arguments, and how to answer."""

    prompt: str | list[int] | None
    messages: list[dict] | None
    sampling: dict
    stream: bool
    include_usage: bool
    logprobs: int | None  # top log-probabilities per token, None: none asked for


# -- checking fields ---------------------------------------------------------------------
def _get(body: dict, name: str, kinds: tuple, default=None, check=None, what: str = ""):
    """body[name] if it has one of `kinds` (bool is not a number) and passes `check`."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{name}: must be {names}, got {json.dumps(value)}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"{name}: {what}, got {json.dumps(value)}", name)
    return value


def _sampling(body: dict, fields: set[str]) -> dict:
    """The SamplingParams arguments the body sets, checked; fields the stage lacks are
    refused when asked for."""
    number = (int, float)
    args = {
        "max_tokens": _get(body, "max_tokens", (int,), 16, lambda v: v >= 1, "must be >= 1"),
        "temperature": _get(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2,
                            "must be in [0, 2]"),
        "top_p": _get(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "top_k": _get(body, "top_k", (int,), -1, lambda v: v == -1 or v >= 0,
                      "must be -1 (all) or >= 0"),
        "min_p": _get(body, "min_p", number, 0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "presence_penalty": _get(body, "presence_penalty", number, 0.0,
                                 lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
        "frequency_penalty": _get(body, "frequency_penalty", number, 0.0,
                                  lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
        "repetition_penalty": _get(body, "repetition_penalty", number, 1.0,
                                   lambda v: v > 0, "must be > 0"),
        "seed": _get(body, "seed", (int,), None, lambda v: 0 <= v < 2 ** 63,
                     "must be in [0, 2**63)"),
        "n": _get(body, "n", (int,), 1, lambda v: 1 <= v <= 64, "must be in [1, 64]"),
        "ignore_eos": _get(body, "ignore_eos", (bool,), False),
        "min_tokens": _get(body, "min_tokens", (int,), 0, lambda v: v >= 0, "must be >= 0"),
    }
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                or len(stop) > 4):
            raise ApiError(400, "stop: must be a non-empty string or a list of at most 4 "
                                f"of them, got {json.dumps(body['stop'])}", "stop")
        args["stop"] = stop
    defaults = {"max_tokens": None, "temperature": None, "top_p": 1.0, "top_k": -1,
                "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "repetition_penalty": 1.0, "seed": None, "n": 1, "ignore_eos": False,
                "min_tokens": 0, "stop": None}
    for name, value in list(args.items()):
        if name not in fields:
            if value != defaults[name]:
                raise ApiError(400, f"{name}: this stage's engine has no such setting",
                               name)
            del args[name]
    return args


def _stream_options(body: dict, stream: bool) -> bool:
    options = _get(body, "stream_options", (dict,), {})
    if body.get("stream_options") is not None and not stream:
        raise ApiError(400, "stream_options: only with stream: true", "stream_options")
    return bool(_get(options, "include_usage", (bool,), False))


def _common(body: dict, served_model: str, fields: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = _get(body, "model", (str,))
    if model is None:
        raise ApiError(400, "model: required", "model")
    if model != served_model:
        raise ApiError(400, f"model: {model!r} is not served here; this server serves "
                            f"{served_model!r}", "model", "model_not_found")
    stream = _get(body, "stream", (bool,), False)
    return dict(sampling=_sampling(body, fields), stream=stream,
                include_usage=_stream_options(body, stream))


def parse_completion(body: dict, served_model: str, fields: set[str]) -> Parsed:
    """POST /v1/completions: one prompt, text or token ids."""
    common = _common(body, served_model, fields)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if not (isinstance(prompt, str) and prompt or isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise ApiError(400, "prompt: must be a non-empty string or list of token ids (one "
                            "prompt per request)", "prompt")
    logprobs = _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS,
                    f"must be in [0, {MAX_LOGPROBS}]")
    sampling = _with_logprobs(common.pop("sampling"), logprobs, fields)
    return Parsed(prompt=prompt, messages=None, sampling=sampling, logprobs=logprobs,
                  **common)


def parse_chat(body: dict, served_model: str, fields: set[str]) -> Parsed:
    """POST /v1/chat/completions: a conversation of {role, content} messages."""
    common = _common(body, served_model, fields)
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages)):
        raise ApiError(400, "messages: must be a non-empty list of {role: system, user or "
                            "assistant, content: a string}", "messages")
    wants = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS,
               f"must be in [0, {MAX_LOGPROBS}]")
    if top is not None and not wants:
        raise ApiError(400, "top_logprobs: only with logprobs: true", "top_logprobs")
    if "max_completion_tokens" in body:
        body = dict(body, max_tokens=body["max_completion_tokens"])
        common["sampling"]["max_tokens"] = _get(body, "max_tokens", (int,), 16,
                                                lambda v: v >= 1, "must be >= 1")
    logprobs = (top or 0) if wants else None
    sampling = _with_logprobs(common.pop("sampling"), logprobs, fields)
    return Parsed(prompt=None, messages=[dict(role=m["role"], content=m["content"])
                                         for m in messages],
                  sampling=sampling, logprobs=logprobs, **common)


def _with_logprobs(sampling: dict, logprobs: int | None, fields: set[str]) -> dict:
    if logprobs is not None:
        if "logprobs" not in fields:
            raise ApiError(400, "logprobs: this stage's engine has no such setting",
                           "logprobs")
        sampling["logprobs"] = logprobs
    return sampling


def sampling_fields(sampling_params_class) -> set[str]:
    return {f.name for f in dataclasses.fields(sampling_params_class) if f.init}


# -- responses ---------------------------------------------------------------------------
class Choices:
    """What each choice of one request has sent so far (text and tokens)."""

    def __init__(self) -> None:
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}

    def deltas(self, output) -> list[tuple]:
        """(completion, new text, new token positions) of each choice that advanced."""
        out = []
        for completion in output.outputs:
            i = completion.index
            text_from, token_from = self.sent_text.get(i, 0), self.sent_tokens.get(i, 0)
            new_text = completion.text[text_from:]
            new_tokens = range(token_from, len(completion.token_ids))
            if new_text or len(new_tokens) or completion.finish_reason:
                out.append((completion, new_text, new_tokens))
            self.sent_text[i] = len(completion.text)
            self.sent_tokens[i] = len(completion.token_ids)
        return out


def usage(output) -> dict:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return dict(prompt_tokens=prompt, completion_tokens=completion,
                total_tokens=prompt + completion)


def finish_reason(completion) -> str | None:
    return None if completion.finish_reason is None else (
        "length" if completion.finish_reason == "length" else "stop")


def _token_text(tokenizer, token_id: int, logprob) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, completion, positions) -> dict:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs."""
    tokens, token_logprobs, tops = [], [], []
    for p in positions:
        token_id = completion.token_ids[p]
        position = completion.logprobs[p]
        chosen = position.get(token_id)
        tokens.append(_token_text(tokenizer, token_id, chosen))
        token_logprobs.append(None if chosen is None else chosen.logprob)
        top = {}  # the most likely ones and the chosen one, by text (byte tokens may
        for t, lp in sorted(position.items(), key=lambda kv: kv[1].rank):  # share one:
            top.setdefault(_token_text(tokenizer, t, lp), lp.logprob)      # the likelier)
        tops.append(top)
    return dict(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=tops,
                text_offset=[])


def chat_logprobs(tokenizer, completion, positions, top: int) -> dict:
    """The chat API's logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for p in positions:
        token_id = completion.token_ids[p]
        position = completion.logprobs[p]
        chosen = position.get(token_id)
        text = _token_text(tokenizer, token_id, chosen)
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank)[:top]
        content.append(dict(
            token=text, logprob=None if chosen is None else chosen.logprob,
            bytes=list(text.encode()),
            top_logprobs=[dict(token=_token_text(tokenizer, t, lp), logprob=lp.logprob,
                               bytes=list(_token_text(tokenizer, t, lp).encode()))
                          for t, lp in ranked]))
    return dict(content=content)


def created() -> int:
    return int(time.time())
