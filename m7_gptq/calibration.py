"""Text for GPTQ calibration and perplexity evaluation, from the Python standard library.

Nothing is downloaded or committed: the text is the docstrings and whole-line comments
of the standard library's own sources (listed with `pkgutil`, never imported). The
modules are split into a calibration half and a held-out half by a stable hash of their
top-level package, so a model is never scored on the text it was quantized on; a text
file may be used instead. `get_windows` cuts a half's tokens into windows of `seq_len`
tokens and takes `num_samples` of them, evenly spaced.

Introduced in M7.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import pkgutil
import re
import sysconfig
from pathlib import Path

# Skipped: GUI and demo code, tests, the codec tables (comments that are byte tables),
# jokes (`this` is ROT13 text), and top-level names starting with "_" (internals, often a
# pure-Python copy of a public module's text).
_SKIP_TOP_LEVEL = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
                   "test", "encodings", "lib2to3", "ensurepip", "pydoc_data"}
_SKIP_PARTS = {"test", "tests", "idle_test", "__main__"}
SPLITS = ("calibration", "heldout")
_COMMENT = re.compile(r"^\s*#+(.*)$")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(module_name: str) -> str:
    """The half a module belongs to, "calibration" or "heldout": whether the first byte
    of the SHA-256 of its top-level package name is even or odd."""
    top = module_name.split(".")[0]
    return SPLITS[hashlib.sha256(top.encode()).digest()[0] % 2]


@functools.lru_cache(maxsize=None)
def stdlib_modules() -> tuple[tuple[str, Path], ...]:
    """(module name, source file) of every standard-library module we read, sorted by name."""
    found: list[tuple[str, Path]] = []

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = prefix + info.name
            if (info.name.startswith("_") and not prefix) or info.name in _SKIP_PARTS:
                continue
            if not prefix and info.name in _SKIP_TOP_LEVEL:
                continue
            if info.ispkg:
                found.append((name, path / info.name / "__init__.py"))
                walk(path / info.name, name + ".")
            elif (path / f"{info.name}.py").is_file():
                found.append((name, path / f"{info.name}.py"))

    walk(stdlib_dir(), "")
    return tuple(sorted((name, file) for name, file in found if file.is_file()))


def module_text(source: str) -> str:
    """A module's docstrings (the module's, then its classes' and functions', outer before
    inner) and its comments (consecutive comment lines joined into one paragraph),
    separated by blank lines."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    docs = [ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef))]
    return "\n\n".join([d for d in docs if d and d.strip()] + _comment_paragraphs(source))


def _comment_paragraphs(source: str) -> list[str]:
    """Runs of whole-line comments, each joined into one line (a regular expression, not
    `tokenize`: twice as fast, and a `#` line inside a string is rare enough)."""
    paragraphs, current = [], []
    for line in source.splitlines() + [""]:
        match = _COMMENT.match(line)
        if match and not line.lstrip().startswith(("#!", "# -*-")):
            current.append(match.group(1).strip())
        elif current:
            paragraphs.append(" ".join(t for t in current if t))
            current = []
    return [p for p in paragraphs if len(p.split()) >= 3]  # skip "noqa", "XXX" and such


@functools.lru_cache(maxsize=None)
def module_texts(split: str) -> tuple[tuple[str, str], ...]:
    """(module name, text) of every module of one half, sorted by name (cached)."""
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    out = []
    for name, file in stdlib_modules():
        if split_of(name) != split:
            continue
        text = module_text(file.read_text(encoding="utf-8", errors="replace"))
        if text:
            out.append((name, text))
    return tuple(out)


def stdlib_text(split: str) -> str:
    """The whole text of one half: its modules' texts, in module order."""
    return "\n\n".join(text for _, text in module_texts(split))


def read_text_file(path: str | Path) -> str:
    """A user's calibration text (UTF-8); ValueError if it cannot be read or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration file: cannot read {path}: {exc}") from exc
    if not text.strip():
        raise ValueError(f"calibration file: {path} is empty")
    return text


def token_windows(token_ids: list[int], num_samples: int, seq_len: int) -> list[list[int]]:
    """`num_samples` windows of `seq_len` tokens, evenly spaced over the non-overlapping
    windows of `token_ids`; ValueError if the text holds fewer windows than asked for."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and "
                         f"{seq_len}")
    available = len(token_ids) // seq_len
    if available < num_samples:
        raise ValueError(f"the text has {len(token_ids)} tokens: {available} windows of "
                         f"{seq_len}, fewer than the {num_samples} asked for")
    if num_samples == 1:
        picks = [0]
    else:
        picks = [round(i * (available - 1) / (num_samples - 1)) for i in range(num_samples)]
    return [token_ids[p * seq_len:(p + 1) * seq_len] for p in picks]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without special tokens, encoded paragraph by paragraph (a fast
    tokenizer takes a list at once; one huge string is slower and warns about length)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    if callable(tokenizer):  # a transformers tokenizer: the whole list in one call
        rows = tokenizer([p + "\n\n" for p in paragraphs], add_special_tokens=False)
        return [t for row in rows["input_ids"] for t in row]
    return [t for p in paragraphs for t in tokenizer.encode(p + "\n\n",
                                                            add_special_tokens=False)]


def get_windows(tokenizer, num_samples: int, seq_len: int, split: str = "calibration",
                text_file: str | Path | None = None) -> list[list[int]]:
    """Token windows of a half of the standard library's text, or of a user's file."""
    text = read_text_file(text_file) if text_file is not None else stdlib_text(split)
    return token_windows(encode(tokenizer, text), num_samples, seq_len)
