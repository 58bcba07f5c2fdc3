#!/usr/bin/env python3
"""Golden tokenization for the `gpt-4o` pre-tokenizer: llama.cpp's `llama-tokenize` on the synthetic gpt-oss model
(the SmolLM2 vocabulary under gpt-oss's pre-tokenizer name) for the hard strings of ../tokenize.json and strings aimed
at the gpt-4o regex (case runs, contractions, digits in threes, punctuation absorbing `/`, non-ASCII letters).

  make_tokenize.py --bin DIR --model gptoss-synthetic.gguf > tokenize.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA = [
    "HelloWorld", "iPhone XR's camera", "CamelCaseWordsAndALLCAPS", "don't I'LL WE'RE they'Ve", "12345678 1234567",
    "a/b\n/c", "hello!!!\n\n/", "path/to/file.rs:12", "ÉCOLE école Éé", "naïve café résumé", "ΑΒΓ αβγ Σσς",
    "Привет Мир", "日本語のテキスト", "emoji 🙂👍 ok", "tabs\tand  spaces   ", "line1\r\nline2", "x\u0301y combining",
    "MixedCASEandlower", "O'Neil's", "3.14159 and 2,718", "JavaScript and TypeScript on GitHub", "YouTube PowerPoint",
    "macOS iOS eBay WiFi LaTeX OpenAI", "DON'T WON'T I'M", "McDonald's", "x=1;y=22;z=333;w=4444",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    texts = [c["text"] for c in json.load(open(os.path.join(HERE, "..", "tokenize.json")))] + EXTRA
    cases = []
    for text in texts:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            f.write(text)
        out = subprocess.run([os.path.join(args.bin, "llama-tokenize"), "-m", args.model, "-f", f.name, "--ids",
                              "--no-escape", "--log-disable"], capture_output=True, text=True, check=True).stdout
        os.unlink(f.name)
        cases.append({"text": text, "ids": json.loads(out.strip().splitlines()[-1])})
    json.dump(cases, sys.stdout, ensure_ascii=False, indent=1)
    print()


if __name__ == "__main__":
    main()
