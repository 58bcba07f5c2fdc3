#!/usr/bin/env python3
"""Renders chats through gpt-oss's harmony chat template with llama-server (`--jinja
--chat-template-file gpt-oss.jinja`, POST /apply-template) and writes apply_template.json.

The template text is a property of the template, not of the model, so any GGUF carries it:
SmolLM2 is used. The rendered date line ("Current date: YYYY-MM-DD") is written as
"Current date: DATE": the comparison replaces today's date the same way.

usage: make_harmony.py LLAMA_BIN_DIR MODEL.gguf
"""
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORT = 18431

CHATS = [
    {"name": "user_only", "messages": [{"role": "user", "content": "Hello!"}]},
    {
        "name": "system_and_user",
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "What is the capital of Italy?"},
        ],
    },
    {
        "name": "developer_message",
        "messages": [
            {"role": "developer", "content": "Be terse.\nNo lists."},
            {"role": "user", "content": "Name three colours."},
        ],
    },
    {
        "name": "multi_turn_with_reasoning",
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
            {
                "role": "assistant",
                "content": "4.",
                "reasoning_content": "Simple arithmetic: 2 + 2 = 4.",
            },
            {"role": "user", "content": "And times 3?"},
        ],
    },
    {
        "name": "earlier_reasoning_dropped",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye.", "reasoning_content": "farewell"},
            {"role": "user", "content": "Wait, one more: ünïcode «ok»?"},
        ],
    },
    {
        "name": "reasoning_effort_high",
        "messages": [{"role": "user", "content": "Prove that sqrt(2) is irrational."}],
        "chat_template_kwargs": {"reasoning_effort": "high"},
    },
    {
        "name": "model_identity",
        "messages": [{"role": "user", "content": "Who are you?"}],
        "chat_template_kwargs": {"model_identity": "You are tp's test model."},
    },
]


def post(path, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORT}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def main():
    bin_dir, model = Path(sys.argv[1]), sys.argv[2]
    server = subprocess.Popen(
        [
            str(bin_dir / "llama-server"), "-m", model, "--port", str(PORT), "-c", "512",
            "--jinja", "--chat-template-file", str(HERE / "gpt-oss.jinja"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit("llama-server did not start")
        out = []
        for chat in CHATS:
            body = {"messages": chat["messages"]}
            if "chat_template_kwargs" in chat:
                body["chat_template_kwargs"] = chat["chat_template_kwargs"]
            prompt = post("/apply-template", body)["prompt"]
            prompt = re.sub(r"Current date: \d{4}-\d{2}-\d{2}", "Current date: DATE", prompt)
            out.append({**chat, "prompt": prompt})
    finally:
        server.terminate()
        server.wait()
    (HERE / "apply_template.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} renderings")


if __name__ == "__main__":
    main()
