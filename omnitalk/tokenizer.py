"""The text tokenizer (Qwen2 byte-level BPE from `tokenizer.json`) and UTF-8-safe streaming decode."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from omnitalk.errors import CheckpointError


class TextTokenizer:
    """encode: plain BPE ids (no BOS/EOS); decode: skips special and unknown ids, like the release."""

    def __init__(self, path: str | Path | None = None, tokenizer: Tokenizer | None = None):
        if tokenizer is None:
            path = Path(path)
            if not path.is_file():
                raise CheckpointError(f"tokenizer not found: {path}")
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise CheckpointError(f"tokenizer {path} cannot be read ({e}); re-download it "
                                      "with `omnitalk download`") from None
        self._tok = tokenizer
        self.vocab_size = self._tok.get_vocab_size()

    @classmethod
    def byte_level(cls) -> "TextTokenizer":
        """A 256-id byte-level tokenizer (no merges), for random-weight models that ship no tokenizer."""
        from tokenizers import decoders, models, pre_tokenizers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tokenizer=tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size])

    def can_write(self, text: str) -> bool:
        """Whether the model can write `text` at all (it survives encode + decode; a closed word-level
        vocabulary, like the small world's, cannot write words it does not have)."""
        return " ".join(self.decode(self.encode(text)).lower().split()) == " ".join(text.lower().split())


class StreamingText:
    """Turns a growing list of text ids into deltas that never split a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; the decoder then yields
    U+FFFD at the end. We hold such a tail back until the next token completes it (or `flush`).
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))
        delta = text[self.sent:stable] if stable > self.sent else ""
        self.sent = max(self.sent, stable)
        return delta

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        delta = text[self.sent:]
        self.sent = len(text)
        return delta

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)
