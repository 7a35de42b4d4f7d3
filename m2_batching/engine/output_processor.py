"""A request's output, built from its sequence after a step: the text, tokens, reason.

A running request's output holds back text that could still turn into a stop string.
Outputs carry the log-probabilities the sampling parameters asked for. The engine builds
them; it reads sequences and never changes one.

Introduced in M1; changed in M2 (the stop rules moved to `core/sched/stop_checker.py`).
"""

from ..outputs import CompletionOutput, RequestOutput
from ..request import Request, Sequence


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
