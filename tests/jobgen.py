"""Synthetic job files for tests and benchmarks: deterministic, every body unique.

``bench/make_job.py`` is its command line. The text is drawn from a small built-in vocabulary
of common English words, so tokenizers see realistic input (about 1.3 tokens a word) instead of
random letters. Each request also names its own index, which makes every body unique (no
accidental caching or deduplication in a benchmark).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

KINDS = ("chat", "responses", "embeddings")
URLS = {
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
}
EMBEDDING_MODEL = "text-embedding-3-small"
BATCH = 4096  # lines joined per write: few syscalls, bounded memory

_VOCABULARY = """
the a an and or but of to in on for with at by from about into over after before under between
order account refund payment invoice card charge subscription plan trial price discount coupon
delivery shipping package tracking address warehouse return exchange replacement warranty
product item size color battery screen charger cable headphones laptop phone camera speaker
app login password email notification update version setting crash error bug page button
customer support agent ticket request issue problem question answer reply message chat call
week month day yesterday today tomorrow morning evening hour minute
i you we they it he she my your our their this that these those there here
is are was were be been has have had do does did can could will would should may might must
not never always still already just only also very really quite too much many more most
good great bad poor slow fast broken missing wrong late early new old cheap expensive easy hard
want need like love hate think know see use try get make take give send receive buy pay
please thanks sorry help again soon now then when why how what which who
"""
_WORDS = tuple(_VOCABULARY.split())
_PUNCT = (",", ".", "?", "!")

_TASKS = {
    "chat": (
        "Classify the support ticket as billing, shipping, technical or other; answer in one word.",
        "Summarise the customer review in one sentence and give its sentiment.",
        "Extract the product, the problem and the requested action as JSON.",
    ),
    "responses": (
        "You triage customer messages. Give a priority from 1 to 5 and a one-line reason.",
        "Rewrite the message as a short, polite reply from the support team.",
    ),
}


def _text(rng: random.Random, words: int, index: int) -> str:
    """Word-ish prose with occasional punctuation, prefixed by the request's own index."""
    picks = rng.choices(_WORDS, k=words)
    for k in range(7, words, 8 + (index % 5)):  # a comma or full stop every few words
        picks[k] += rng.choice(_PUNCT)
    return f"#{index}: " + " ".join(picks)


def _body(
    kind: str, rng: random.Random, index: int, words: int, max_tokens: int, model: str
) -> dict[str, object]:
    text = _text(rng, words, index)
    if kind == "embeddings":
        return {"model": EMBEDDING_MODEL, "input": text}
    tasks = _TASKS[kind]
    task = tasks[index % len(tasks)]
    if kind == "chat":
        body: dict[str, object] = {
            "model": model,
            "messages": [{"role": "system", "content": task}, {"role": "user", "content": text}],
        }
        if max_tokens:
            body["max_completion_tokens"] = max_tokens
    else:
        body = {"model": model, "instructions": task, "input": text}
        if max_tokens:
            body["max_output_tokens"] = max_tokens
    return body


def write_job(
    path: str | Path,
    n: int,
    *,
    seed: int = 0,
    prompt_words: int = 40,
    max_tokens: int = 64,
    mix: Sequence[str] = ("chat",),
    model: str = "gpt-4o-mini",
) -> None:
    """Stream ``n`` requests to ``path``, cycling through the endpoint kinds in ``mix``.

    ``max_tokens`` 0 leaves the output limit out. Embeddings always use text-embedding-3-small.
    """
    bad = [k for k in mix if k not in KINDS]
    if bad or not mix:
        raise ValueError(f"unknown kinds in mix: {bad or 'empty'} (choose from {', '.join(KINDS)})")
    rng = random.Random(seed)
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    width = max(6, len(str(n)))
    kinds = list(mix)
    with open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as f:
        for start in range(0, n, BATCH):
            lines = []
            for i in range(start, min(start + BATCH, n)):
                kind = kinds[i % len(kinds)]
                body = _body(kind, rng, i, prompt_words, max_tokens, model)
                lines.append(
                    f'{{"custom_id":"req-{i:0{width}d}","method":"POST",'
                    f'"url":"{URLS[kind]}","body":{dumps(body)}}}\n'
                )
            f.write("".join(lines))


# Job shapes for the projection (``price --sample``): mixed models, endpoints and output limits.
SHAPES = {
    # A summarization job: three models, output limits from 128 to 1,024, prompts of varying
    # length, chat and Responses requests.
    "summaries": {
        "models": (("gpt-4o-mini", 6), ("gpt-4.1-mini", 3), ("gpt-4o", 1)),
        "limits": (128, 256, 512, 1024),
        "words": (30, 400),
        "mix": ("chat", "chat", "responses"),
    },
    # A labelling job: short prompts, and a fifth of the requests without an output limit
    # (priced at the model's largest output).
    "labels": {
        "models": (("gpt-4o-mini", 4), ("gpt-4.1-nano", 1)),
        "limits": (16, 16, 32, 64, 0),
        "words": (10, 60),
        "mix": ("chat",),
    },
}


def write_shaped_job(path: str | Path, n: int, shape: str, *, seed: int = 0) -> None:
    """Stream ``n`` requests of one of ``SHAPES`` to ``path`` (deterministic for a seed)."""
    spec = SHAPES[shape]
    rng = random.Random(seed)
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    models = [m for m, _ in spec["models"]]
    weights = [w for _, w in spec["models"]]
    low, high = spec["words"]
    width = max(6, len(str(n)))
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in range(n):
            kind = rng.choice(spec["mix"])
            model = rng.choices(models, weights)[0]
            words = rng.randint(low, high)
            body = _body(kind, rng, i, words, rng.choice(spec["limits"]), model)
            f.write(
                f'{{"custom_id":"req-{i:0{width}d}","method":"POST",'
                f'"url":"{URLS[kind]}","body":{dumps(body)}}}\n'
            )
