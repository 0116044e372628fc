"""Generated tokens' log-probabilities in the API's two shapes.

The engine gives each token its log-probability under the model (before temperature, top-k
and top-p) and its row's likeliest alternatives (server/outputs.py TokenLogprob). A token's
text is its own bytes read as UTF-8: a piece of a multi-byte character reads as U+FFFD, and
`bytes` (chat) holds the exact bytes (for byte-level BPE tokenizers, models/tokenizer.py
token_bytes; others give the token decoded alone). A choice's entries are formatted from `start` on (a
stream sends each chunk the ones since the last).
"""
from __future__ import annotations

from server.api.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.outputs import TokenLogprob

OFFSET_CONTEXT = 6   # tokens decoded before each one to measure the text it adds


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def spelling(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def chat(self, token_ids: list[int], entries: list[TokenLogprob], start: int = 0) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text, raw = self.spelling(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=raw)

        content = []
        for token_id, entry in zip(token_ids[start:], entries[start:]):
            text, raw = self.spelling(token_id)
            content.append(ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=raw,
                                            top_logprobs=[top(t, lp) for t, lp in entry.top]))
        return ChatLogprobs(content=content)

    def completion(self, token_ids: list[int], entries: list[TokenLogprob | None], start: int = 0,
                   special_text: bool = False) -> CompletionLogprobs:
        """The legacy shape: each token's top_logprobs holds the token itself, then its row's
        likeliest (as OpenAI's do: up to logprobs + 1 entries; a spelling shared by several
        tokens keeps the likeliest's); text_offset is where the token's text starts in the
        text of the tokens (with special tokens' text for an echoed prompt, special_text;
        without it for generated text, as the output is detokenized). An entry None (a
        prompt's first token) gives None values."""
        out = CompletionLogprobs(text_offset=self.offsets(token_ids, start, len(entries), special_text))
        for i in range(start, len(entries)):
            token_id, entry = token_ids[i], entries[i]
            text = self.spelling(token_id)[0]
            out.tokens.append(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            top = {text: entry.logprob}
            for alternative, logprob in entry.top:
                top.setdefault(self.spelling(alternative)[0], logprob)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(top)
        return out

    def offsets(self, token_ids: list[int], start: int, end: int, special_text: bool) -> list[int]:
        """len(decode(token_ids[:i])) for i in start..end - 1, without decoding every prefix
        (a long scored prompt would take seconds): each token adds what it adds to the text
        of the few tokens before it (a character split over tokens, a space cleaned up, are
        settled within them)."""
        def length(ids: list[int]) -> int:
            return len(self.tokenizer.decode(ids, skip_special_tokens=not special_text))

        offset, offsets = length(token_ids[:start]), []
        for i in range(start, end):
            offsets.append(offset)
            window = token_ids[max(0, i - OFFSET_CONTEXT):i + 1]
            offset += length(window) - length(window[:-1])
        return offsets
