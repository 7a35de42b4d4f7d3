"""A request's output, built from its sequences after a step: the text, tokens, reason.

A running request's output holds back text that could still turn into a stop string.
Outputs carry the log-probabilities the sampling parameters asked for; a request with n
samples has a completion per sample, and says how much of its prompt was cached. The
engine builds them; it reads sequences and never changes one.

Introduced in M1; changed in M2 (the stop rules moved to `core/sched/stop_checker.py`),
M6 (n completions; cached tokens).
"""

from ..outputs import CompletionOutput, RequestMetrics, RequestOutput
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


def make_output(request: Request) -> RequestOutput:
    """The request's output so far: one completion per sample (M6: n of them; the
    request finishes with the last)."""
    seqs, first = request.sequences, request.sequences[0]
    if len(seqs) == 1:  # the usual case, for every token of every request: kept lean
        completions, metrics = [completion(first, request)], first.metrics
    else:
        completions, metrics = [completion(seq, request) for seq in seqs], merged_metrics(seqs)
    return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                         prompt_token_ids=request.prompt_token_ids, outputs=completions,
                         finished=None not in [c.finish_reason for c in completions],
                         metrics=metrics,
                         prompt_logprobs=first.prompt_logprobs,
                         num_cached_tokens=first.num_prompt_cached_tokens or 0)


def completion(seq: Sequence, request: Request) -> CompletionOutput:
    finished = seq.status.is_finished
    return CompletionOutput(
        index=seq.index, text=visible_text(seq, request.sampling_params),
        token_ids=seq.output_token_ids,  # a new list: later tokens do not change it
        finish_reason=seq.status.value if finished else None, stop_reason=seq.stop_reason,
        logprobs=None if request.sampling_params.logprobs is None else list(seq.output_logprobs))


def merged_metrics(seqs: list[Sequence]) -> RequestMetrics:
    """n samples as one request (M6): its first token is the earliest sample's, it
    finishes with the last, and its output tokens are all of theirs."""
    firsts = [s.metrics.first_token_time for s in seqs
              if s.metrics.first_token_time is not None]
    finishes = [s.metrics.finish_time for s in seqs]
    return RequestMetrics(seqs[0].metrics.arrival_time, min(firsts, default=None),
                          None if None in finishes else max(finishes),
                          sum(s.metrics.num_output_tokens for s in seqs))
