"""POST /tokenize and /detokenize (vLLM's extensions): what a prompt or a conversation costs
in tokens, and token ids back to text, with the served model's tokenizer and chat template."""
from __future__ import annotations

from server.api.errors import bad_request
from server.api.protocol import (ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                 TokenizeResponse)
from server.api.serving import Serving
from server.api.tools import template_messages


def tokenize(body: TokenizeRequest, serving: Serving) -> TokenizeResponse:
    serving.served_model(body.model)
    llm = serving.llm
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send either prompt or messages", param="prompt" if body.prompt is None else "messages")
    if body.prompt is not None:
        tokens = llm.tokenizer.encode(body.prompt)
    else:
        chat = ChatCompletionRequest(messages=body.messages, tools=body.tools, tool_choice=body.tool_choice)
        unsupported = chat.unsupported()
        if unsupported is not None:
            raise bad_request(unsupported[1], param=unsupported[0])
        try:
            tokens = llm.tokenizer.apply_chat_template(*template_messages(chat, llm.tokenizer.renders_tools))
        except ValueError as e:
            raise bad_request(str(e), param="messages") from e
    return TokenizeResponse(count=len(tokens), max_model_len=llm.max_model_len, tokens=tokens)


def detokenize(body: DetokenizeRequest, serving: Serving) -> DetokenizeResponse:
    serving.served_model(body.model)
    tokenizer = serving.llm.tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise bad_request(f"token ids must be in [0, {tokenizer.vocab_size}), got {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))
