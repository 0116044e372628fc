"""Generated tokens' log-probabilities in the API's two shapes.

The engine gives each token its log-probability under the model (before temperature, top-k
and top-p) and its row's likeliest alternatives (server/outputs.py TokenLogprob). A token's
text is its own bytes read as UTF-8: a piece of a multi-byte character reads as U+FFFD, and
`bytes` (chat) holds the exact bytes.
"""
from __future__ import annotations

from server.api.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.outputs import TokenLogprob


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def spelling(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def chat(self, token_ids: list[int], entries: list[TokenLogprob]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text, raw = self.spelling(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=raw)

        content = []
        for token_id, entry in zip(token_ids, entries):
            text, raw = self.spelling(token_id)
            content.append(ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=raw,
                                            top_logprobs=[top(t, lp) for t, lp in entry.top]))
        return ChatLogprobs(content=content)

    def completion(self, token_ids: list[int], entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        """offset: where the first token's text starts in the choice's text."""
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            text = self.spelling(token_id)[0]
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append({self.spelling(t)[0]: lp for t, lp in entry.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out
