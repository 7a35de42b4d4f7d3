"""Tokenizers: the model folder's own (through transformers), or a byte-level stand-in.

Dummy models have no tokenizer files, so text prompts on them use `ByteTokenizer`: one
token per UTF-8 byte, shifted past a few special ids.

Introduced in M0.
"""

import warnings
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ByteTokenizer:
    """Token id = byte value + 3; ids 0, 1, 2 are pad, BOS and EOS."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    _OFFSET = 3

    def __init__(self, vocab_size: int, eos_token_id: int | None = None) -> None:
        if vocab_size < 256 + self._OFFSET:
            raise ValueError(f"vocab_size {vocab_size} is too small for byte tokens")
        self.vocab_size = vocab_size
        if eos_token_id is not None:
            self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + self._OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raw = bytes(i - self._OFFSET for i in ids if self._OFFSET <= i < 256 + self._OFFSET)
        return raw.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [repr(chr(i - self._OFFSET)) if self._OFFSET <= i < 256 + self._OFFSET
                else f"<{i}>" for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def get_tokenizer(model_path: Path | None, vocab_size: int, eos_token_id: int | None):
    """The folder's tokenizer, or `ByteTokenizer` for dummy models and folders without one."""
    if model_path is None:
        return ByteTokenizer(vocab_size, eos_token_id)
    if not any((model_path / f).is_file() for f in _TOKENIZER_FILES):
        warnings.warn(f"{model_path} has no tokenizer files; using the byte-level stand-in")
        return ByteTokenizer(vocab_size, eos_token_id)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: cannot load a tokenizer from {model_path}: {exc}") from exc
