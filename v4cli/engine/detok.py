"""Incremental detokenization that never splits a UTF-8 character, and stop-string holdback."""

from __future__ import annotations

from tokenizers import Tokenizer

from quant import keys as K
from quant.tokenizer import tokenizer_json_from_kv
from quant.errors import CheckpointError, GGUFError
from v4cli.prompt.encoding import BOS, BOS_ID, EOS, EOS_ID, SPECIAL_TOKENS, default_tokenizer_path


def tokenizer_from_metadata(md: dict) -> Tokenizer:
    """The model file's tokenizer: the tokenizer.json we keep verbatim under `tokenizer.huggingface.json`, else
    (files made by llama.cpp and community quants) one built from the standard `tokenizer.ggml.*` keys.

    Either way the vocabulary must be V4's: the prompt format's special tokens must be single tokens at the ids
    the encoder assumes, or the model would be fed a format it was never trained on."""
    raw = md.get(K.Tokenizer.HF_JSON)
    try:
        if not raw:
            raw = tokenizer_json_from_kv(md, default_tokenizer_path().read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(raw)
    except CheckpointError as e:
        raise GGUFError(str(e), hint=e.hint) from None
    except Exception as e:  # tokenizers raises a bare Exception on a malformed tokenizer
        raise GGUFError(f"the model file's tokenizer does not load: {e}") from None
    for text, want in ((BOS, BOS_ID), (EOS, EOS_ID), *((s, None) for s in SPECIAL_TOKENS)):
        got = tok.token_to_id(text)
        if got is None or (want is not None and got != want):
            raise GGUFError(f"the model file's vocabulary is not DeepSeek-V4's: {text!r} is "
                            + ("missing" if got is None else f"token {got}, not {want}"),
                            hint="v4 runs DeepSeek-V4 GGUFs only")
    return tok


class Detokenizer:
    """Feed token ids one at a time; get back only text that is final (complete UTF-8 characters)."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None):
        self.tok = tokenizer
        # a few context tokens so that byte-level merges and leading spaces decode as they will in the stream
        self.ids: list[int] = list(context[-4:]) if context else []
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix: self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held (possibly an incomplete character) at the end of generation."""
        before = self._decode(self.ids[self.prefix: self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopMatcher:
    """Holds back text that might begin a stop string; reports a stop and truncates before it."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the text, once one did

    def push(self, text: str) -> tuple[str, bool]:
        """→ (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda h: (h[0], -len(h[1])))  # earliest; the longest at a tie
            self.pending = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
