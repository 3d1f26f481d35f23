"""The token layout derived from a Config: special ids, layer shift, logit slices.

Streams per position: 0..n_audio_layers-1 are audio layers, the last one is text.
Audio ids are *local* (0..audio_vocab_size-1) inside the model's logit slices and *absolute*
(text_vocab_size + audio_vocab_size * layer + local) in input ids.
"""
from __future__ import annotations

from dataclasses import dataclass

from omnitalk.config import Config

# the release uses the first five; "irq"/"n_irq" are omnitalk's interruption status tokens (151941/151942
# in the released vocabulary), taken from the 59 reserved text specials for the paper's duplex task
TEXT_SPECIALS = ("eot", "pad_t", "input_t", "answer_t", "asr", "irq", "n_irq")
AUDIO_SPECIALS = ("eoa", "pad_a", "input_a", "answer_a", "split", "image", "eoimage")


@dataclass(frozen=True)
class TokenLayout:
    text_vocab_size: int
    audio_vocab_size: int
    n_audio_layers: int
    n_specials: int

    @classmethod
    def from_config(cls, cfg: Config) -> "TokenLayout":
        return cls(cfg.text_vocab_size, cfg.audio_vocab_size, cfg.n_audio_layers, cfg.n_specials)

    # ---- text specials (absolute ids): _eot = 151936, _pad_t, _input_t, _answer_t, _asr ----
    @property
    def text_special_base(self) -> int:
        return self.text_vocab_size - self.n_specials

    def text_special(self, name: str) -> int:
        return self.text_special_base + TEXT_SPECIALS.index(name)

    @property
    def eot(self) -> int: return self.text_special("eot")
    @property
    def pad_t(self) -> int: return self.text_special("pad_t")
    @property
    def input_t(self) -> int: return self.text_special("input_t")
    @property
    def answer_t(self) -> int: return self.text_special("answer_t")
    @property
    def asr(self) -> int: return self.text_special("asr")
    @property
    def irq(self) -> int: return self.text_special("irq")
    @property
    def n_irq(self) -> int: return self.text_special("n_irq")

    # ---- audio specials (local ids): _eoa = 4096, _pad_a, _input_a, _answer_a, ... ----------
    @property
    def codebook_size(self) -> int:
        return self.audio_vocab_size - self.n_specials

    def audio_special(self, name: str) -> int:
        return self.codebook_size + AUDIO_SPECIALS.index(name)

    @property
    def eoa(self) -> int: return self.audio_special("eoa")
    @property
    def pad_a(self) -> int: return self.audio_special("pad_a")
    @property
    def input_a(self) -> int: return self.audio_special("input_a")
    @property
    def answer_a(self) -> int: return self.audio_special("answer_a")
    @property
    def image(self) -> int: return self.audio_special("image")
    @property
    def eoimage(self) -> int: return self.audio_special("eoimage")

    # ---- layout -------------------------------------------------------------------------
    @property
    def n_streams(self) -> int:
        return self.n_audio_layers + 1

    @property
    def text_stream(self) -> int:
        return self.n_audio_layers

    def audio_offset(self, layer: int) -> int:
        return self.text_vocab_size + self.audio_vocab_size * layer

    def shift(self, local: int, layer: int) -> int:
        """Local audio id -> absolute id of `layer` (the official `layershift`)."""
        return local + self.audio_offset(layer)

    def audio_slice(self, layer: int) -> slice:
        o = self.audio_offset(layer)
        return slice(o, o + self.audio_vocab_size)

    @property
    def text_slice(self) -> slice:
        return slice(0, self.text_vocab_size)
