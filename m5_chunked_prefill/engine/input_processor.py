"""What comes in, checked before a request is queued: its prompt and sampling parameters.

A prompt is text (valid Unicode: a lone surrogate cannot be encoded) or a list of token
ids (ints, not bools, inside the vocabulary). Sampling parameters check themselves
(`sampling_params.py`) except what needs the model: stop token ids must be in the
vocabulary. Anything else raises `TypeError` or `ValueError` naming what is wrong,
before the engine holds anything of the request.

Introduced in M1.
"""

from ..config import is_int
from ..sampling_params import SamplingParams


def is_token_id(value, vocab_size: int) -> bool:
    return is_int(value) and 0 <= value < vocab_size


def all_token_ids(values: list, vocab_size: int) -> bool:
    """Every value a token id. Plain ints, the usual case, are checked by builtins that
    loop in C (a prompt may hold thousands of them); anything else one by one."""
    if set(map(type, values)) == {int}:
        return 0 <= min(values) and max(values) < vocab_size
    return all(is_token_id(value, vocab_size) for value in values)


def encode_prompt(prompt, tokenizer, vocab_size: int) -> list[int]:
    """The token ids of a prompt; raises if it is empty, of the wrong type or out of range."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"prompt: is not valid text ({exc.reason} at index "
                             f"{exc.start})") from None
        token_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list):
        token_ids = list(prompt)
        if not all_token_ids(token_ids, vocab_size):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab_size})")
    else:
        raise TypeError(f"prompt: must be a str or a list of token ids (ints), "
                        f"got {type(prompt).__name__}")
    if not token_ids:
        raise ValueError("prompt: has no tokens")
    return token_ids


def check_sampling_params(params, vocab_size: int) -> SamplingParams:
    """`params` (or the defaults for None), checked against the model's vocabulary."""
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params: must be a SamplingParams, got "
                        f"{type(params).__name__}")
    outside = [t for t in params.stop_token_ids if not is_token_id(t, vocab_size)]
    if outside:
        raise ValueError(f"stop_token_ids: {outside[:3]} are not token ids of this model "
                         f"(integers in [0, {vocab_size}))")
    return params
