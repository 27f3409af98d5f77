"""Text as tokens arrive: each new token's share of the decoded text, in constant time per token.

Decoding the whole output again after every token costs O(n) per token. Like vLLM's incremental
detokenizer, this decodes only a short window: the tokens since the last text was emitted, against
the same window less the newest tokens. Both are decoded from the same first token, so whatever a
tokenizer does at the start of a text (SentencePiece drops a leading space) cancels out. A token
that ends inside a multi-byte character decodes to U+FFFD and is held back until it completes.
"""

from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here...
        self._read = 0  # ...and the text of everything before this index has been emitted

    def add(self, token: int) -> str:
        """The text `token` completes ('' while it ends inside a character)."""
        self.ids.append(token)
        if self.tokenizer is None:  # a model without a tokenizer: token ids in, token ids out
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]
