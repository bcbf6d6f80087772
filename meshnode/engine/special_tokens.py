"""A budget on the special tokens in a prompt, counted before llama.cpp tokenizes it.

llama.cpp's special-token parsing splits the text at every special token it finds, and
each split copies the rest of the text: the cost grows with (special tokens found) x
(prompt length). 60,000 "<s>" took 13.6 s on the tiny model and 100k tokens took 127 s
on Gemma; even inside the byte cap (engine.base.MAX_PROMPT_BYTES_PER_TOKEN) a 32k
context admits ~87k of them. Counting them first is linear: one regex over a trie of the
vocabulary's special texts, stopping at the first token past the budget.

Not verified: that the count equals llama.cpp's (overlaps are resolved leftmost-longest
here); it is only a bound on the work, so an over-count just refuses a prompt earlier.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from meshnode.engine.base import PromptTooLong

# Counted: special texts other than whitespace runs. Gemma's vocabulary makes "\n", runs
# of spaces and tabs, and HTML tags user-defined special tokens; whitespace runs are cheap
# to parse (180 KB of "\n": 0.36 s, a 256 KB source file with 6.6k lines: 1.2 s, Gemma
# 3 270M on this project's 2-core EPYC) and fill every code or prose prompt, so they are
# not counted. Markers and tags are what cost: 20,000 "<s>" took 3.75 s and 40,000
# "<td>" 10.3 s. 4,096 of them is a 1,000-turn chat or a large HTML page, and costs
# well under 2 s of the tokenizer thread at the byte cap of a 32k context.
MAX_SPECIAL_TOKENS_PER_PROMPT = 4096


class TooManySpecialTokens(PromptTooLong):
    """The prompt holds more special tokens than MAX_SPECIAL_TOKENS_PER_PROMPT."""


def special_texts(vocab: Any, n_vocab: int) -> list[str]:
    """The texts llama.cpp parses as special tokens (control, user-defined, unknown)."""
    import llama_cpp  # slow to import; only engines that have a vocabulary need it

    special = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
               | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
    texts = []
    for token in range(n_vocab):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & special:
            raw = llama_cpp.llama_vocab_get_text(vocab, token)
            if raw:
                texts.append(raw.decode("utf-8", errors="replace"))
    return texts


def _trie_pattern(texts: Iterable[str]) -> str:
    """A regex matching any of `texts`, longest first, built from their trie so that each
    position is decided in one pass down the trie (not one try per text)."""
    trie: dict[str, Any] = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a text

    def pattern(node: dict[str, Any]) -> str:
        ends = "" in node
        branches = [re.escape(ch) + pattern(child) for ch, child in node.items() if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if ends else body

    return pattern(trie)


class SpecialTokenBudget:
    """Refuses (TooManySpecialTokens) a text holding more than `limit` special tokens."""

    def __init__(self, texts: Iterable[str], limit: int = MAX_SPECIAL_TOKENS_PER_PROMPT
                 ) -> None:
        words = {t for t in texts if t and not t.isspace()}
        self.limit = limit
        self._regex = re.compile(_trie_pattern(words)) if words else None

    def count(self, text: str) -> int:
        """Special tokens in `text`, counted up to limit + 1."""
        if self._regex is None:
            return 0
        found = 0
        for _ in self._regex.finditer(text):
            found += 1
            if found > self.limit:
                break
        return found

    def check(self, text: str) -> None:
        found = self.count(text)
        if found > self.limit:
            raise TooManySpecialTokens(
                f"the prompt holds more than {self.limit} special tokens (chat-template "
                "markers, and tags such as <td> in some vocabularies); a chat needs about 4 "
                "per turn"
            )
