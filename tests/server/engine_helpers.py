"""Helpers for driving an LLMEngine to completion in tests."""
from server.generate import generate

PROMPTS = [
    "Write a haiku about autumn leaves.",
    "What is the capital of Japan?",
    "Explain what a linked list is in two sentences.",
    "Write a Python function that checks whether a number is prime.",
    "List five animals that live in the ocean.",
    "How do I make a cup of tea?",
    "Translate 'good morning' into French and Spanish.",
    "What is 12 times 11?",
    "Give me three tips for writing clean code.",
    "Describe the water cycle.",
    "Write a SQL query that counts rows in a table named users.",
    "Why is the sky blue?",
    "Summarize the plot of Cinderella in one paragraph.",
    "What are the primary colors?",
    "Write a JavaScript arrow function that doubles a number.",
    "Name the planets of the solar system.",
    "def quicksort(arr):",
    "Tell me a short joke about computers.",
    "What does HTTP stand for?",
    "Write a limerick about a cat who loves pizza.",
    "Explain the difference between a process and a thread.",
    "import numpy as np\n\n# compute the mean of each row\n",
]


def chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])


def run_to_completion(engine, requests, max_steps=10_000):
    """requests: {request_id: (prompt_ids, params)} -> {request_id: output token ids}."""
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
    outputs = {request_id: [] for request_id in requests}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    assert not engine.has_unfinished_requests()
    return outputs


def reference(engine, ids, params, same_attention=False):
    """Plain greedy decoding (server/generate.py) with the engine's model: through PyTorch's
    attention, or with same_attention through the engine's own backend and KV-cache dtype
    (where the bits must match: on 8-bit integer products a last-bit difference can flip an
    activation's rounding; an fp16 cache rounds keys and values)."""
    same = {"attention": engine.runner.attention_cls, "kv_cache_dtype": engine.kv_cache.k.dtype} if same_attention else {}
    return generate(engine.model, ids, params, engine.tokenizer.eos_token_ids, **same)
