#!/usr/bin/env python3
"""Drives tp's OpenAI-compatible server with the official `openai` package.

    client.py test --base-url http://127.0.0.1:8080/v1   # the checks tests/openai_client.rs runs
    client.py load --base-url http://127.0.0.1:8080/v1   # the load table (docs/PERFORMANCE.md)
    client.py chat-turns --base-url ...   # time to first token per turn of a chat that resends
                                          # its history (the prefix cache's table)
    client.py shared-prefix --base-url ...  # concurrent chats that share a long system prompt

`test` exits non-zero on the first failed check and says which; `load` prints a markdown table.
"""

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
import urllib.request

import openai

PROMPTS = [
    "The capital of France is",
    "Once upon a time, a small robot",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite book is",
    "In 1969, the first person to walk on the moon",
    "A haiku about autumn:",
    "The recipe for pancakes starts with",
    "Photosynthesis is the process by which",
    "The largest planet in the solar system",
    "To learn a new language, you should",
    "The theory of relativity says",
    "Here is a list of fruits: apple,",
    "The best way to sort a list in Python is",
    "Dear hiring manager, I am writing to",
]


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def metrics(base_url):
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def greedy_stream(client, model, prompt, max_tokens):
    """Streams a greedy completion; returns (text, finish_reason, ttft, gaps)."""
    started = time.perf_counter()
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )
    text, finish, first, last, gaps = "", None, None, None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        now = time.perf_counter()
        if choice.text:
            if first is None:
                first = now - started
            else:
                gaps.append(now - last)
            last = now
            text += choice.text
        if choice.finish_reason:
            finish = choice.finish_reason
    return text, finish, first, gaps


def test(args):
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    # Completion: text, usage, finish reason.
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    check(c.object == "text_completion", f"object {c.object}")
    check(c.choices[0].finish_reason in ("length", "stop"), f"finish_reason {c.choices[0].finish_reason}")
    check(c.usage.prompt_tokens > 0 and 0 < c.usage.completion_tokens <= 8, f"usage {c.usage}")
    check(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens, "total_tokens")
    print(f"completion: {c.choices[0].text!r} ({c.usage.completion_tokens} tokens)")

    # The same prompt streamed gives the same text (greedy).
    text, finish, _, _ = greedy_stream(client, model, "The capital of France is", 8)
    check(text == c.choices[0].text, f"streamed {text!r} != {c.choices[0].text!r}")
    check(finish == c.choices[0].finish_reason, "streamed finish reason")

    # Chat, plain and streamed with usage.
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    check(r.object == "chat.completion", f"object {r.object}")
    check(r.choices[0].message.role == "assistant", "role")
    check(r.usage.completion_tokens > 0, "chat usage")
    pieces, usage, roles = [], None, 0
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles += 1
            if choice.delta.content:
                pieces.append(choice.delta.content)
    check(roles == 1, "one role delta")
    check("".join(pieces) == r.choices[0].message.content, "streamed chat text")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"stream usage {usage}")
    print(f"chat: {r.choices[0].message.content!r}")

    # Log-probabilities: chat form and completions form, consistent with each other and sorted.
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    check(len(content) >= 1, "chat logprobs content")
    for entry in content:
        check(len(entry.top_logprobs) == 5, "five alternatives")
        tops = [t.logprob for t in entry.top_logprobs]
        check(tops == sorted(tops, reverse=True), "alternatives best first")
        check(all(lp <= 0 for lp in tops), "log-probabilities are <= 0")
        # Greedy: the chosen token is the most likely one.
        check(entry.token == entry.top_logprobs[0].token, f"greedy token {entry.token!r}")
        check(abs(entry.logprob - tops[0]) < 1e-5, "chosen logprob = best alternative")
        check(bytes(entry.bytes).decode("utf-8", "replace") == entry.token, "bytes match token")
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset), "parallel lists")
    check(all(len(t) == 3 for t in lp.top_logprobs), "three alternatives")
    check("".join(lp.tokens) == c.choices[0].text, "tokens spell the text")
    check(lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, "text offsets")
    print(f"logprobs: {list(zip(lp.tokens, [round(x, 3) for x in lp.token_logprobs]))}")

    # Stop strings: cut before the stop string, finish_reason "stop", streamed alike.
    long = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=24, temperature=0).choices[0].text
    check(" 6" in long, f"the counting prompt counts: {long!r}")
    cut = long[: long.index(" 6")]
    c = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=24, temperature=0, stop=[" 6", "zzz"])
    check(c.choices[0].text == cut, f"stop: {c.choices[0].text!r} != {cut!r}")
    check(c.choices[0].finish_reason == "stop", "stop finish reason")
    text = ""
    for chunk in client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=24, temperature=0, stop=" 6", stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
    check(text == cut, f"streamed stop: {text!r}")
    print(f"stop: {cut!r}")

    # Penalties and seeds: accepted, and a seed repeats itself.
    kw = dict(model=model, prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=42, presence_penalty=0.5, frequency_penalty=0.5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    check(a.choices[0].text == b.choices[0].text, "the same seed gives the same text")

    # Errors come back as the client's exception types.
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
        check(False, "unknown model accepted")
    except openai.NotFoundError as e:
        check(e.code == "model_not_found", f"code {e.code}")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=4, top_p=3)
        check(False, "top_p 3 accepted")
    except openai.BadRequestError:
        pass

    # 16 concurrent greedy streams with different prompts: each returns what it returns alone.
    alone = {p: greedy_stream(client, model, p, args.tokens)[0] for p in PROMPTS}
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = dict(zip(PROMPTS, pool.map(lambda p: greedy_stream(client, model, p, args.tokens)[0], PROMPTS)))
    for p in PROMPTS:
        check(together[p] == alone[p], f"{p!r}: together {together[p]!r} != alone {alone[p]!r}")
    print(f"16 concurrent greedy streams: all equal to their runs alone ({args.tokens} tokens each)")

    # Cancellation: 8 streams dropped mid-way free their slots; the next request succeeds.
    before = metrics(args.base_url)

    def abandon(prompt):
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=200, temperature=0, stream=True)
        seen = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                seen += 1
                if seen == 3:
                    break
        stream.close()
        return seen

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        check(all(s == 3 for s in pool.map(abandon, PROMPTS[:8])), "streams produced text before cancelling")
    deadline = time.time() + 10
    while True:
        m = metrics(args.base_url)
        if m["tp_slots_busy"] == 0 and m["tp_queue_depth"] == 0:
            break
        check(time.time() < deadline, f"slots still busy 10 s after cancelling: {m['tp_slots_busy']}")
        time.sleep(0.1)
    cancelled = m["tp_requests_cancelled_total"] - before["tp_requests_cancelled_total"]
    check(cancelled == 8, f"{cancelled} cancellations counted, not 8")
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    check(c.choices[0].text == alone["The capital of France is"][: len(c.choices[0].text)], "request after cancelling")
    print("cancellation: 8 streams dropped, all slots free, the next request succeeds")

    # Load: 64 requests, 8 at a time: zero errors.
    table = load_rows(client, model, [8], requests=64, max_tokens=args.tokens)
    print(table)
    print("all checks passed")


def load_rows(client, model, concurrency_levels, requests, max_tokens):
    """Runs `requests` greedy streams at each concurrency; returns a markdown table."""
    rows = [
        "| streams | requests | errors | generated tokens/s | vs 1 stream | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = None
    for level in concurrency_levels:
        results, errors = [], 0
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(level) as pool:
            futures = [
                pool.submit(greedy_stream_tokens, client, model, PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens)
                for i in range(requests)
            ]
            for f in futures:
                try:
                    results.append(f.result())
                except Exception as e:  # noqa: BLE001 - every failure counts as an error
                    errors += 1
                    print(f"error: {e}", file=sys.stderr)
        elapsed = time.perf_counter() - started
        tokens = sum(r[0] for r in results)
        rate = tokens / elapsed
        base = base or rate
        ttft = sorted(r[1] for r in results)
        gaps = sorted(g for r in results for g in r[2])
        pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")
        rows.append(
            f"| {level} | {requests} | {errors} | {rate:.1f} | {rate / base:.2f} | "
            f"{pct(ttft, 0.5):.0f} / {pct(ttft, 0.99):.0f} | {pct(gaps, 0.5):.1f} / {pct(gaps, 0.99):.1f} |"
        )
        check(errors == 0, f"{errors} errors at {level} streams")
    return "\n".join(rows)


def greedy_stream_tokens(client, model, prompt, max_tokens):
    """(completion tokens, ttft, gaps) of one streamed greedy completion, from the usage chunk."""
    started = time.perf_counter()
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    first, last, gaps, tokens = None, None, [], 0
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            if first is None:
                first = now - started
            else:
                gaps.append(now - last)
            last = now
    check(first is not None, "a stream with no text")
    return tokens, first, gaps


def load(args):
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    levels = [int(x) for x in args.streams.split(",")]
    print(f"model {model}, {args.requests} requests per level, {args.tokens} tokens each (ignore_eos off)")
    print(load_rows(client, model, levels, args.requests, args.tokens))


CHAT_TURNS = [
    "Tell me about the sea.",
    "And about mountains?",
    "What about rivers?",
    "And deserts?",
    "Summarize all of it.",
]


def chat_turns(args):
    """One chat, each turn resending the conversation: ms to the first content token per
    turn, and the prompt tokens the server reused (tp_prompt_tokens_cached_total)."""
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    before = metrics(args.base_url)
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    ttfts = []
    for question in CHAT_TURNS:
        messages.append({"role": "user", "content": question})
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.tokens, temperature=0, stream=True,
        )
        first, text = None, ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - started
                text += chunk.choices[0].delta.content
        check(first is not None, "a turn with no text")
        ttfts.append(first * 1e3)
        messages.append({"role": "assistant", "content": text})
    after = metrics(args.base_url)
    name = "tp_prompt_tokens_cached_total"
    total = "tp_prompt_tokens_total"
    print("TTFT ms per turn: " + " / ".join(f"{t:.0f}" for t in ttfts))
    print(
        f"prompt tokens reused: {after.get(name, 0) - before.get(name, 0):.0f} of "
        f"{after.get(total, 0) - before.get(total, 0):.0f}"
    )


def shared_prefix(args):
    """Chats that share a long system prompt, `streams` at a time: one first alone (it fills
    the cache), then `requests` more with other questions. Prints the TTFT percentiles of the
    later ones and the prompt tokens the server reused (blocks shared across requests)."""
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    with open(args.text_file) as f:
        system = "Answer from this text only.\n\n" + f.read()[: args.chars]

    def ask(i):
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (question {i})"},
            ],
            max_tokens=args.tokens, temperature=0, stream=True,
        )
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        check(first is not None, "a reply with no text")
        return first

    before = metrics(args.base_url)
    cold = ask(0)
    with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
        ttft = sorted(pool.map(ask, range(1, args.requests + 1)))
    after = metrics(args.base_url)
    pct = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] * 1e3
    reused = after.get("tp_prompt_tokens_cached_total", 0) - before.get("tp_prompt_tokens_cached_total", 0)
    total = after.get("tp_prompt_tokens_total", 0) - before.get("tp_prompt_tokens_total", 0)
    print(
        f"first request alone: TTFT {cold * 1e3:.0f} ms; then {args.requests} at {args.streams} "
        f"streams: TTFT p50 {pct(0.5):.0f} / p99 {pct(0.99):.0f} ms; prompt tokens reused "
        f"{reused:.0f} of {total:.0f}"
    )


def slot_save(args):
    """Times saving and restoring a long conversation (POST /slots/0?action=save|restore):
    reads a long prompt into slot 0 (the server runs with --parallel 1 and --slot-save-path),
    saves it, erases the slot, restores it and sends the same prompt plus one word."""
    root = args.base_url.rsplit("/v1", 1)[0]

    def post(path, body):
        request = urllib.request.Request(
            root + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as reply:
            out = json.load(reply)
        return out, (time.perf_counter() - started) * 1e3

    with open(args.text_file) as f:
        text = f.read()[: args.chars]
    out, ms = post("/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0})
    print(f"prompt of {out['usage']['prompt_tokens']} tokens computed in {ms:.0f} ms")
    out, ms = post("/slots/0?action=save", {"filename": args.name})
    print(
        f"save: {out['n_saved']} tokens, {out['n_written'] / 2**20:.1f} MiB over the workers; "
        f"workers {out['timings']['save_ms']:.1f} ms, request {ms:.1f} ms"
    )
    post("/slots/0?action=erase", {})
    out, ms = post("/slots/0?action=restore", {"filename": args.name})
    print(f"restore: {out['n_restored']} tokens; workers {out['timings']['restore_ms']:.1f} ms, request {ms:.1f} ms")
    out, ms = post("/v1/completions", {"prompt": text + " And", "max_tokens": 1, "temperature": 0})
    print(f"the same prompt plus one word after the restore: {ms:.0f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test")
    t.add_argument("--base-url", required=True)
    t.add_argument("--tokens", type=int, default=24)
    l = sub.add_parser("load")
    l.add_argument("--base-url", required=True)
    l.add_argument("--streams", default="1,4,8,16")
    l.add_argument("--requests", type=int, default=64)
    l.add_argument("--tokens", type=int, default=64)
    c = sub.add_parser("chat-turns")
    c.add_argument("--base-url", required=True)
    c.add_argument("--tokens", type=int, default=32)
    p = sub.add_parser("shared-prefix")
    p.add_argument("--base-url", required=True)
    p.add_argument("--text-file", default="tests/data/golden/ppl_text.txt")
    p.add_argument("--chars", type=int, default=3000)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16)
    s = sub.add_parser("slot-save")
    s.add_argument("--base-url", required=True)
    s.add_argument("--text-file", default="tests/data/golden/ppl_text.txt")
    s.add_argument("--chars", type=int, default=9000)
    s.add_argument("--name", default="long-conversation")
    args = parser.parse_args()
    try:
        {"test": test, "load": load, "chat-turns": chat_turns, "shared-prefix": shared_prefix, "slot-save": slot_save}[
            args.command
        ](args)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
