"""Check that the site's search index will not break the theme's search (docs tooling).

mkdocs-material searches in the browser with lunr 2.3.9: its search worker reads
`search/search_index.json`, splits each section's text into terms, and builds one
automaton (a `TokenSet`) over all terms, which every query is run through. While it
builds the automaton, lunr merges equal subtrees, and it tells them apart by a key
that writes each edge as its character followed by the child's numeric id, with
nothing in between. When edge characters are digits the key is ambiguous (edges
`1`->234 and `5`->6 give "0123456"; so do `1`->2 and `3`->456): two different
subtrees share a key, one replaces the other, the automaton accepts terms the index
never had, and a query that reaches one of them fails with "Cannot read properties of
undefined (reading '_index')": the reader sees "No matching documents" for words the
site is full of. Bare numbers are what make it likely (the results tables, the constants
in the diffs' code, the notebooks' outputs: thousands of terms that branch on digits);
with them in the index almost any edit of a page gave such a merge somewhere. So the
site's `separator` (mkdocs.yml) makes a bare number a separator rather than a term, and
the generated stage diffs keep their code out of the index; words with digits in them
(m4, h100, qwen2.5) are still terms, and are few.

This module builds the same automaton the same way, from the built index, and reports
every merge of two subtrees that are not equal:

    python tools/search_check.py site/search/search_index.json
    python tools/search_check.py --query "prefix cache" --query block   # Node.js: results

The hook (`tools/mkdocs_hooks.py`) runs it after each build and stops the build if it
finds one. Tokens as the theme makes them: the text outside HTML tags, split at the
index's `separator`, lower-cased, the stop words dropped (the `pipeline` of the index's
config; the list is read from the installed theme's search worker).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


# -- the terms, as the theme's search worker makes them -------------------------------
def _text_parts(value: str) -> list[str]:
    """The text between HTML tags, the way the worker walks a field: a `<` starts a tag,
    a `>` ends it."""
    parts, start = [], 0
    for end, char in enumerate(value):
        if char == "<" and end > start:
            parts.append(value[start:end])
            start = end
        elif char == ">":
            start = end + 1
    if len(value) > start:
        parts.append(value[start:])
    return [p for p in parts if not p.startswith("<")]


def _js_separator(pattern: str) -> re.Pattern:
    """The index's separator (a JavaScript regular expression) in Python. The theme's
    default, `[\\s\\-]+`, the site's (mkdocs.yml), character classes and fixed-width
    look-arounds read the same in both."""
    return re.compile(pattern)


def terms_of(index: dict, stop_words: set[str]) -> set[str]:
    """Every term the worker puts in its inverted index: from each document's title,
    text and tags."""
    config = index.get("config") or {}
    separator = _js_separator(config.get("separator") or r"[\s\-]+")
    drop = stop_words if "stopWordFilter" in (config.get("pipeline") or []) else set()
    if set(config.get("pipeline") or []) - {"stopWordFilter"}:
        raise ValueError("the index asks for a stemmer or trimmer: this check only knows "
                         "the stop-word filter (the theme's default for English)")
    terms: set[str] = set()
    for doc in index.get("docs") or []:
        values = [doc.get("title") or "", doc.get("text") or ""] + list(doc.get("tags") or [])
        for value in values:
            for part in _text_parts(value):
                for token in separator.split(part):
                    token = token.lower()
                    if token and token not in drop:
                        terms.add(token)
    return terms


def _theme_worker() -> Path:
    import material

    folder = Path(material.__file__).parent / "templates" / "assets" / "javascripts" / "workers"
    workers = sorted(folder.glob("search.*.min.js"))
    if not workers:
        raise FileNotFoundError(f"no search worker in {folder}")
    return workers[0]


def theme_stop_words(worker: Path | None = None) -> set[str]:
    """lunr's English stop words, as the installed theme's search worker has them."""
    text = (worker or _theme_worker()).read_text(encoding="utf-8")
    lists = re.findall(r"generateStopWordFilter\(\s*\[([^\]]*)\]", text)
    if not lists:
        raise ValueError("the theme's search worker has no stop-word list this check can read")
    return set(json.loads(f"[{lists[0]}]"))


# -- lunr's TokenSet builder -----------------------------------------------------------
def _units(word: str) -> str:
    """The word as JavaScript indexes it: UTF-16 code units (a character above U+FFFF
    is two surrogates)."""
    if all(ord(c) <= 0xFFFF for c in word):
        return word
    data = word.encode("utf-16-le", "surrogatepass")
    return "".join(chr(int.from_bytes(data[i:i + 2], "little")) for i in range(0, len(data), 2))


@dataclass(eq=False)
class _Node:
    id: int
    final: bool = False
    edges: dict[str, "_Node"] = field(default_factory=dict)
    key: str | None = None  # lunr's cached key, once the node is minimized
    shape: tuple | None = None  # the same, written so that it cannot be ambiguous


def _lunr_key(node: _Node) -> str:
    if node.key is not None:
        return node.key
    return ("1" if node.final else "0") + "".join(
        label + str(node.edges[label].id) for label in sorted(node.edges))


def _shape(node: _Node) -> tuple:
    return (node.final, tuple((label, node.edges[label].id) for label in sorted(node.edges)))


@dataclass
class Collision:
    key: str  # the key the two subtrees share
    kept: tuple  # (final, ((label, child id), ...)) of the subtree lunr keeps
    dropped: tuple  # ... of the different one it drops in its favour
    prefix: str  # the terms that lose their ending start like this


def token_set_collisions(terms: set[str], first_id: int = 1) -> list[Collision]:
    """Build lunr's TokenSet over `terms` the way `lunr.TokenSet.fromArray` does (terms
    in JavaScript's sort order, node ids counting up from `first_id`: lunr's counter
    starts at 1 and the worker builds no other TokenSet before this one) and return
    every merge of two different subtrees."""
    words = sorted(_units(t) for t in terms)  # code-unit order, as JavaScript sorts
    next_id = first_id

    def new_node() -> _Node:
        nonlocal next_id
        next_id += 1
        return _Node(next_id - 1)

    root = new_node()
    unchecked: list[tuple[_Node, str, _Node, str]] = []  # parent, char, child, prefix
    minimized: dict[str, _Node] = {}
    collisions: list[Collision] = []

    def minimize(down_to: int) -> None:
        while len(unchecked) > down_to:
            parent, char, child, prefix = unchecked.pop()
            key = _lunr_key(child)
            if key in minimized:
                kept = minimized[key]
                if kept.shape != _shape(child):
                    collisions.append(Collision(key, kept.shape, _shape(child), prefix))
                parent.edges[char] = kept
            else:
                child.key, child.shape = key, _shape(child)
                minimized[key] = child

    previous = ""
    for word in words:
        common = 0
        for a, b in zip(word, previous):
            if a != b:
                break
            common += 1
        minimize(common)
        node = unchecked[-1][2] if unchecked else root
        for i in range(common, len(word)):
            child = new_node()
            node.edges[word[i]] = child
            unchecked.append((node, word[i], child, word[:i + 1]))
            node = child
        node.final = True
        previous = word
    minimize(0)
    return collisions


def check_index(path: Path, stop_words: set[str] | None = None) -> list[Collision]:
    """The collisions the theme's search worker will make from this search index."""
    index = json.loads(Path(path).read_text(encoding="utf-8"))
    words = theme_stop_words() if stop_words is None else stop_words
    return token_set_collisions(terms_of(index, words))


# -- the theme's own search, in Node.js ------------------------------------------------
# The search worker expects a browser worker's globals: `self`, `addEventListener` and
# `postMessage`. This gives it those, sends it the index (the setup message, type 0) and
# then each query (type 2), and prints the number of results of each as JSON.
_NODE_SHIM = r"""
const fs = require("fs");
const [worker, indexPath, queries] = process.argv.slice(1);
globalThis.self = globalThis;
let handler = null, reply = null;
globalThis.addEventListener = (type, fn) => { handler = fn; };
globalThis.postMessage = message => reply(message);
console.warn = () => {};  // the worker warns about a failed query, then answers none
(0, eval)(fs.readFileSync(worker, "utf8"));
const send = data => new Promise(resolve => { reply = resolve; handler({ data }); });
(async () => {
  const index = JSON.parse(fs.readFileSync(indexPath, "utf8"));
  await send({ type: 0, data: { ...index, options: { suggest: false } } });
  const counts = {};
  for (const query of JSON.parse(queries))
    counts[query] = (await send({ type: 2, data: query })).data.items.length;
  process.stdout.write(JSON.stringify(counts));
})();
"""


def theme_search(index: Path, queries: list[str], node: str = "node") -> dict[str, int]:
    """The number of results the theme's search worker gives for each query over this
    index, run in Node.js (no browser): the search a reader of the site gets."""
    import subprocess

    result = subprocess.run([node, "-e", _NODE_SHIM, str(_theme_worker()), str(index),
                             json.dumps(queries)], capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"the search worker failed in Node.js: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


def describe(collisions: list[Collision], limit: int = 5) -> str:
    lines = [f"{len(collisions)} merge(s) of different subtrees in the search automaton; "
             "queries reaching these prefixes fail in the browser:"]
    for c in collisions[:limit]:
        lines.append(f"  key {c.key!r} under {c.prefix!r}: kept {c.kept}, dropped {c.dropped}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/search_check.py",
                                description="Check a built search index for the lunr "
                                            "TokenSet collisions that break the search.")
    p.add_argument("index", nargs="?", default="site/search/search_index.json",
                   help="the built search index (default: site/search/search_index.json)")
    p.add_argument("--query", action="append", default=[], metavar="WORDS",
                   help="also run this query through the theme's search worker in Node.js "
                        "and print its number of results (repeatable)")
    args = p.parse_args(argv)
    index = json.loads(Path(args.index).read_text(encoding="utf-8"))
    terms = terms_of(index, theme_stop_words())
    collisions = token_set_collisions(terms)
    digits = sum(1 for t in terms if any(c.isdigit() for c in t))
    print(f"{len(index.get('docs') or [])} sections, {len(terms)} terms "
          f"({digits} with a digit)")
    for query, count in (theme_search(Path(args.index), args.query).items()
                         if args.query else []):
        print(f"{query!r}: {count} results")
    if collisions:
        print(describe(collisions))
        return 1
    print("no collisions: every term the search automaton accepts is in the index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
