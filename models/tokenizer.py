"""Tokenizer and chat template (Hugging Face `transformers`), and streaming detokenization."""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    """Encodes text and chat messages to token ids and decodes them back."""

    def __init__(self, model_dir: str | Path, eos_token_ids: tuple[int, ...] = ()):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:
            raise ValueError(f"no usable tokenizer in {model_dir} ({e})") from e
        eos = set(eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._byte_alphabet: dict[str, int] | None = None   # token_bytes: spelling character -> byte

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (a piece of a multi-byte character stays a piece): read from
        its byte-level BPE spelling where the tokenizer is one (GPT-2's, SmolLM2's), else
        the token decoded alone."""
        if self._byte_alphabet is None:
            decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
            self._byte_alphabet = byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else {}
        added = self.hf.added_tokens_decoder.get(token_id)
        if added is not None:   # special and added tokens are spelled as their text
            return added.content.encode()
        spelling = self.hf.convert_ids_to_tokens(token_id)
        if self._byte_alphabet and spelling is not None and all(c in self._byte_alphabet for c in spelling):
            return bytes(self._byte_alphabet[c] for c in spelling)
        return self.decode([token_id], skip_special_tokens=False).encode()

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template shows the model a `tools` list (else server/api/tools.py
        describes them in a system message)."""
        return "tools" in str(self.hf.chat_template or "")

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation followed by the assistant's turn opening. A template
        that refuses the conversation (its own checks, a missing field) raises ValueError."""
        from jinja2 import TemplateError
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions instead")
        try:
            out = self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        except (TemplateError, TypeError, KeyError) as e:
            raise ValueError(f"the chat template cannot render these messages: {e}") from e
        return list(out["input_ids"] if hasattr(out, "keys") else out)


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2) spells byte b as one printable character: b itself where
    printable (! to ~, ¡ to ¬, ® to ÿ), else the next code point from 256 on, in byte order.
    Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + len(spelled) - len(printable))
    return {c: b for b, c in spelled.items()}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are safe to stream.

    Decoding token by token breaks multi-byte characters and drops the spaces some
    tokenizers attach to a token's neighbour. Instead we decode a short window ending at the
    newest token and emit only what the window adds beyond its already-emitted part, holding
    back text that still ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])[-6:]  # context so the first token decodes right
        self.prefix_offset = 0              # window start
        self.read_offset = len(self.ids)    # ids before this are already emitted
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Append token ids; return the newly completed text (maybe empty)."""
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
