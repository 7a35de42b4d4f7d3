"""After each sampled token: update the text, apply the stop rules, build outputs.

Text is decoded incrementally (only the last few tokens are decoded again each step, and
a partial UTF-8 character waits for the next token). Stop rules, in order: EOS (unless
ignore_eos) and stop token ids, stop strings, max_tokens, and the model's length limit;
none of the first three fire before min_tokens are out. A running request's output
holds back text that could still turn into a stop string. Outputs carry the
log-probabilities the sampling parameters asked for.

Introduced in M1.
"""

import time

from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..request import Request, Sequence, SequenceStatus


def detokenize_step(seq: Sequence, tokenizer) -> str:
    """The text the newest token adds (may be "" while a character is incomplete)."""
    ids = seq.token_ids
    before = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    after = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if len(after) < len(before) or after.endswith("\ufffd"):
        return ""  # wait: the next tokens complete the character
    # A token that adds no text at all (a skipped special one) moves the window on too,
    # so the text decoded per step stays a few tokens long.
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    return after[len(before):]


def check_stop(seq: Sequence, request: Request, eos_token_ids: list[int],
               new_text: str, max_model_len: int) -> None:
    """Set seq.status (and stop_reason) if the newest token ends the sequence."""
    params = request.sampling_params
    token = seq.token_ids[-1]
    if seq.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token in eos_token_ids:
            seq.status = SequenceStatus.FINISHED_STOPPED
            return
        if token in params.stop_token_ids:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
            return
        if new_text and _truncate_at_stop_string(seq, params, len(new_text)):
            return
    if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= max_model_len:
        seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED


def _truncate_at_stop_string(seq: Sequence, params, num_new_chars: int) -> bool:
    """Find a stop string that ends inside the new text; cut the text there."""
    text = seq.output_text
    best = None
    for stop in params.stop_strings:
        # Search only where a match could involve the new characters.
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return False
    index, stop = best
    seq.output_text = text[:index + len(stop)] if params.include_stop_str_in_output else text[:index]
    seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
    return True


def process_token(seq: Sequence, request: Request, token: int, tokenizer,
                  eos_token_ids: list[int], max_model_len: int) -> None:
    """Append a sampled token and update text, status and metrics."""
    now = time.perf_counter()
    seq.token_ids.append(token)
    if seq.metrics.first_token_time is None:
        seq.metrics.first_token_time = now
    new_text = detokenize_step(seq, tokenizer)
    seq.output_text += new_text
    check_stop(seq, request, eos_token_ids, new_text, max_model_len)
    seq.metrics.num_output_tokens = seq.num_output_tokens
    if seq.status.is_finished:
        seq.metrics.finish_time = now


def visible_text(seq: Sequence, params) -> str:
    """The text an output may show: never text that a stop string may later take back.

    While the sequence runs, the longest suffix of its text that is a proper prefix of a
    stop string is held back (the next tokens may complete that stop string, and the
    text is then cut before it). With include_stop_str_in_output nothing is taken back,
    so nothing is held. Once finished, the whole (already cut) text shows.
    """
    text = seq.output_text
    if seq.status.is_finished or params.include_stop_str_in_output:
        return text
    held = 0
    for stop in params.stop_strings:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return text[:len(text) - held]


def make_output(seq: Sequence, request: Request) -> RequestOutput:
    finished = seq.status.is_finished
    completion = CompletionOutput(
        index=0, text=visible_text(seq, request.sampling_params),
        token_ids=seq.output_token_ids,  # a new list: later tokens do not change it
        finish_reason=seq.status.value if finished else None, stop_reason=seq.stop_reason,
        logprobs=None if request.sampling_params.logprobs is None else list(seq.output_logprobs))
    return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                         prompt_token_ids=request.prompt_token_ids, outputs=[completion],
                         finished=finished, metrics=seq.metrics,
                         prompt_logprobs=seq.prompt_logprobs)


def to_logprobs(position: dict[int, tuple[float, int]], tokenizer) -> dict[int, Logprob]:
    """The runner's (log-probability, rank) per token id, as `Logprob`s with their text."""
    return {token: Logprob(logprob, rank, tokenizer.decode([token]))
            for token, (logprob, rank) in position.items()}
