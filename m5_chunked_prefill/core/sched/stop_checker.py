"""What a sampled token does to its sequence: appended, its text decoded, the stop rules.

Text is decoded incrementally (only the last few tokens are decoded again each step, and
a partial UTF-8 character waits for the next token). Stop rules, in order: EOS (unless
ignore_eos) and stop token ids, stop strings, max_tokens, and the length limit; none of
the first three fire before min_tokens are out. Log-probabilities are kept with their
text. The scheduler calls it from `update_from_output`, the one place a step's results
change a sequence.

Introduced in M2 (M1's engine did this itself); changed in M4 (`ends_by_length`).
"""

import time

from ...outputs import Logprob
from ...request import Sequence, SequenceStatus


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len  # no sequence grows past it

    def append_token(self, seq: Sequence, token: int) -> None:
        """Append a sampled token and update text, status and metrics."""
        now = time.perf_counter()
        seq.token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        new_text = detokenize_step(seq, self.tokenizer)
        seq.output_text += new_text
        check_stop(seq, self.eos_token_ids, new_text, self.max_model_len)
        seq.metrics.num_output_tokens = seq.num_output_tokens
        if seq.status.is_finished:
            seq.metrics.finish_time = now

    def ends_by_length(self, seq: Sequence, num_more: int) -> bool:
        """True if `num_more` more tokens bring `seq` to max_tokens or the length limit
        (M4: its last token can be pending on the device, and then it needs no step)."""
        return num_more > 0 and (
            seq.num_output_tokens + num_more >= seq.sampling_params.max_tokens
            or len(seq.token_ids) + num_more >= self.max_model_len)

    def record_logprobs(self, seq: Sequence, start: int, prompt_logprobs, logprobs) -> None:
        """Keep what the runner computed. `prompt_logprobs[j]` is of the token at position
        start + 1 + j: each prompt position is kept once (not again when the sequence is
        recomputed), positions past the prompt not at all."""
        if prompt_logprobs is not None:
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]  # the first token has no context to score it
            for position, position_logprobs in enumerate(prompt_logprobs, start + 1):
                if position == len(seq.prompt_logprobs) and position < seq.num_prompt_tokens:
                    seq.prompt_logprobs.append(self.to_logprobs(position_logprobs))
        if logprobs is not None:
            seq.output_logprobs.append(self.to_logprobs(logprobs))

    def to_logprobs(self, position: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        """The runner's (log-probability, rank) per token id, as `Logprob`s with their text."""
        return {token: Logprob(logprob, rank, self.tokenizer.decode([token]))
                for token, (logprob, rank) in position.items()}


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


def check_stop(seq: Sequence, eos_token_ids: list[int], new_text: str,
               max_model_len: int) -> None:
    """Set seq.status (and stop_reason) if the newest token ends the sequence."""
    params = seq.sampling_params
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
