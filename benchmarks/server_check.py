"""A running server, checked from outside: greedy texts, streaming, a bad request, load, metrics.

    python -m benchmarks.server_check --url http://127.0.0.1:8000 --expected texts.json
                                      [--max-tokens 96] [--concurrency 16]

`texts.json` (from `python -m benchmarks.parity --save`) maps prompts to the greedy texts
another set-up gave (say the CPU path); each must come back the same from the server at
temperature 0, streamed and not. Then a malformed request must get an OpenAI-style 400, a
burst of --concurrency requests must all finish, and /metrics must count them. Prints a
table; exits non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx


async def wait_healthy(client: httpx.AsyncClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"the server was not healthy within {timeout:.0f} s")


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream}


async def chat(client: httpx.AsyncClient, body: dict) -> tuple[str, int]:
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]


async def chat_streamed(client: httpx.AsyncClient, body: dict) -> str:
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                if choices:
                    text += choices[0]["delta"].get("content") or ""
    return text


async def run(args) -> list[tuple[str, bool, str]]:
    with open(args.expected) as f:
        expected = json.load(f)
    checks = []
    async with httpx.AsyncClient(base_url=args.url, timeout=300) as client:
        await wait_healthy(client, args.wait)
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = list(expected)[: args.prompts]
        same = [(await chat(client, chat_body(model, p, args.max_tokens)))[0] == expected[p] for p in prompts]
        checks.append(("greedy texts equal the expected ones", all(same), f"{sum(same)}/{len(same)}"))
        streamed = [await chat_streamed(client, chat_body(model, p, args.max_tokens, True)) == expected[p]
                    for p in prompts[:4]]
        checks.append(("streamed texts equal them too", all(streamed), f"{sum(streamed)}/{len(streamed)}"))
        bad = await client.post("/v1/chat/completions", json={"model": model, "messages": [], "max_tokens": -1})
        error = bad.json().get("error", {}) if bad.headers.get("content-type", "").startswith("application/json") else {}
        checks.append(("a malformed request gets an OpenAI-style 400", bad.status_code == 400 and "message" in error,
                       f"{bad.status_code} {error.get('message', bad.text)[:60]!r}"))
        burst = [chat_body(model, list(expected)[i % len(expected)], args.max_tokens) for i in range(args.concurrency)]
        started = time.perf_counter()
        results = await asyncio.gather(*(chat(client, body) for body in burst), return_exceptions=True)
        seconds = time.perf_counter() - started
        ok = [r for r in results if not isinstance(r, BaseException)]
        tokens = sum(n for _, n in ok)
        checks.append((f"{args.concurrency} requests at once all finish", len(ok) == len(burst),
                       f"{len(ok)}/{len(burst)}, {tokens / seconds:.0f} tokens/s over {seconds:.1f} s"))
        metrics = (await client.get("/metrics")).text
        finished = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("gorgon_requests_total{"))
        accepted = next((line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("gorgon_spec_decode_accepted_tokens_total ")), "?")
        total = len(prompts) + len(streamed) + len(burst) + 1
        checks.append(("/metrics counts every request", finished >= total - 1,
                       f"{finished:.0f} finished (sent {total}, 1 malformed), accepted drafts {accepted}"))
    return checks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--expected", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--wait", type=float, default=180, help="seconds to wait for /health")
    args = parser.parse_args(argv)
    checks = asyncio.run(run(args))
    print("| check | passed | detail |\n|---|---|---|")
    for name, passed, detail in checks:
        print(f"| {name} | {'yes' if passed else 'NO'} | {detail} |")
    if not all(passed for _, passed, _ in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
