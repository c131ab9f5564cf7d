"""Benchmark `batchrun price` against raw tiktoken encoding of the same texts, in one run.

Usage: python bench/price_bench.py [--requests 1000000] [--keep FILE] [--repeat 3]
       [--mix chat] [--prompt-words 40] [--seed 0] [--no-batch-baseline]

1. Writes a synthetic job with bench/make_job.py (or reuses ``--keep FILE`` if it exists).
2. (b) ``price_job`` in-process, timed end to end: file reading, hashing, JSON parsing,
   validation, token counting and pricing (what ``batchrun price`` does, minus printing).
3. A prepass (not timed) extracts every string the counter encodes: roles, names, contents,
   instructions and embedding inputs; it checks that their tokens plus the per-message overhead
   equal the plan's input tokens, so both sides provably encode the same texts.
4. (a) raw tiktoken: ``enc.encode_ordinary`` over exactly those strings, in a plain loop.

The vocabularies the job needs are loaded before any timing (a fixed per-process cost, printed
separately) and count in the peak RSS, as they do for `batchrun price`. The first (b) run
happens before the prepass so its peak RSS is that of pricing alone; the other runs alternate
(a) and (b). Figures are medians. The goal: (b) throughput >= 70% of (a).

``price_job`` counts message texts in one tokenizer call per chunk of lines (exact; see
``runner.tokens.count_texts``). For an honest comparison the same run also times (a3) raw
tiktoken called that way (the same texts joined per ~1 MB at a special token, one call per
chunk, one thread) and, as a two-thread raw baseline, (a2) tiktoken's own
``encode_ordinary_batch(texts, num_threads=2)`` (skip with --no-batch-baseline: its thread pool
makes it much slower than (a) on short texts).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from runner.plan import Plan, price_job  # noqa: E402
from runner.pricing import load_price_table  # noqa: E402
from runner.tokens import (  # noqa: E402
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    count_texts,
)
from runner.vocab import encoding_name_for_model, get_encoding  # noqa: E402

GOAL = 0.70
_IGNORED_ITEM_KEYS = frozenset({"type", "id", "status"})  # Responses item metadata


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: VmHWM, because ru_maxrss of a process started by another (vfork + exec) begins at its
    parent's RSS. Elsewhere ru_maxrss (KiB; bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


class UnsupportedShape(Exception):
    """A request the prepass cannot mirror exactly (images, tools, ...)."""


def _strings(obj: dict[str, Any], texts: list[str], skip: frozenset[str] = frozenset()) -> int:
    """Append every string value of one message; return the +1s owed for a ``name``."""
    extra = 0
    for key, value in obj.items():
        if type(value) is str:
            if key in skip:
                continue
            texts.append(value)
            extra += TOKENS_PER_NAME if key == "name" else 0
        elif value is not None:
            raise UnsupportedShape(f"message field {key!r} is not plain text")
    return extra


def request_texts(url: str, body: dict[str, Any], texts: list[str]) -> int:
    """Append the strings the counter encodes for one request; return its fixed overhead."""
    if url == "/v1/embeddings":
        value = body["input"]
        for text in [value] if type(value) is str else value:
            if type(text) is not str:
                raise UnsupportedShape("embeddings input is not text")
            texts.append(text)
        return 0
    overhead = REPLY_PRIMING
    if url == "/v1/chat/completions":
        if any(k in body for k in ("tools", "functions", "response_format")):
            raise UnsupportedShape("tools or a response format")
        for message in body["messages"]:
            overhead += TOKENS_PER_MESSAGE + _strings(message, texts)
        return overhead
    if url == "/v1/responses":
        if type(body.get("instructions")) is str:
            texts += ["developer", body["instructions"]]
            overhead += TOKENS_PER_MESSAGE
        items = body["input"]
        if type(items) is str:
            texts += ["user", items]
            return overhead + TOKENS_PER_MESSAGE
        for item in items:
            if "role" not in item:
                raise UnsupportedShape("a non-message input item")
            overhead += TOKENS_PER_MESSAGE + _strings(item, texts, _IGNORED_ITEM_KEYS)
        return overhead
    raise UnsupportedShape(f"endpoint {url}")


def prepass(path: Path) -> tuple[dict[str, list[str]], int]:
    """Every string to encode, grouped by encoding, and the per-request overhead tokens."""
    groups: dict[str, list[str]] = {}
    overhead = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            request = json.loads(line)
            body = request["body"]
            name, _fallback = encoding_name_for_model(body["model"])
            overhead += request_texts(request["url"], body, groups.setdefault(name, []))
    return groups, overhead


def encodings_used(path: Path, lines: int = 1000) -> list[str]:
    """The encodings the first ``lines`` requests need (generated files cycle their kinds)."""
    names: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for _, line in zip(range(lines), f, strict=False):
            if line.strip():
                names.add(encoding_name_for_model(json.loads(line)["body"]["model"])[0])
    return sorted(names)


def raw_tiktoken(groups: dict[str, list[str]]) -> int:
    """Encode every text with ``encode_ordinary``; the total token count."""
    total = 0
    for name, texts in groups.items():
        encode = get_encoding(name).encode_ordinary
        for text in texts:
            total += len(encode(text))
    return total


def raw_tiktoken_batch(groups: dict[str, list[str]], threads: int = 2) -> int:
    """tiktoken's parallel API: ``encode_ordinary_batch`` (a thread pool, one task per text)."""
    total = 0
    for name, texts in groups.items():
        enc = get_encoding(name)
        for start in range(0, len(texts), 100_000):  # bounded lists of token lists
            batch = enc.encode_ordinary_batch(texts[start : start + 100_000], num_threads=threads)
            total += sum(map(len, batch))
    return total


def raw_tiktoken_joined(groups: dict[str, list[str]], chunk_chars: int = 1 << 20) -> int:
    """The texts joined at a special token, one tokenizer call per ~``chunk_chars``."""
    total = 0
    for name, texts in groups.items():
        enc = get_encoding(name)
        start = size = 0
        for i, text in enumerate(texts):
            size += len(text)
            if size >= chunk_chars:
                total += count_texts(enc, texts[start : i + 1])
                start, size = i + 1, 0
        total += count_texts(enc, texts[start:])
    return total


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}; "
        f"load average at the end {load}"
    )


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="price_bench_") as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "job.jsonl"
        if path.exists():
            print(f"reusing {path}")
        else:
            make_job = _load(ROOT / "bench" / "make_job.py")
            mix = tuple(k.strip() for k in args.mix.split(",") if k.strip())
            took, _ = timed(
                lambda: make_job.write_job(
                    path, args.requests, seed=args.seed, prompt_words=args.prompt_words, mix=mix
                )
            )
            print(f"wrote {path} in {took:.1f} s")
        return measure(path, args.repeat, batch_baseline=args.batch_baseline)


def measure(path: Path, repeat: int, *, batch_baseline: bool = True) -> int:
    size = path.stat().st_size
    table = load_price_table()
    names = encodings_used(path)
    took, _ = timed(lambda: [get_encoding(n) for n in names])
    print(f"loaded {', '.join(names)} in {took:.2f} s (not counted below)")

    rss_before = peak_rss_bytes()
    times: dict[str, list[float]] = {key: [] for key in ("a", "a2", "a3", "b")}
    took, plan = timed(lambda: price_job(path, table))
    times["b"].append(took)
    rss_price = peak_rss_bytes()
    assert isinstance(plan, Plan)
    requests = plan.total.requests

    try:
        took, (groups, overhead) = timed(lambda: prepass(path))
    except UnsupportedShape as e:
        print(f"error: the prepass mirrors plain-text requests only: {e}", file=sys.stderr)
        return 2
    texts = sum(len(t) for t in groups.values())
    print(f"prepass: {texts:,} strings to encode, extracted in {took:.1f} s (not timed)")
    raws: list[tuple[str, Callable[[], int]]] = [
        ("a", lambda: raw_tiktoken(groups)),
        ("a3", lambda: raw_tiktoken_joined(groups)),
    ]
    if batch_baseline:
        raws.append(("a2", lambda: raw_tiktoken_batch(groups)))
    for i in range(repeat):
        for key, fn in raws:
            took, tokens = timed(fn)
            times[key].append(took)
            if tokens + overhead != plan.total.input_tokens:
                print(
                    f"error: raw tokens {tokens:,} ({key}) + overhead {overhead:,} != plan input "
                    f"tokens {plan.total.input_tokens:,}: the two sides did not encode the same "
                    "texts",
                    file=sys.stderr,
                )
                return 1
        if i < repeat - 1:
            took, again = timed(lambda: price_job(path, table))
            times["b"].append(took)
            assert again == plan

    med = {key: statistics.median(runs) for key, runs in times.items() if runs}
    mb = size / 1e6
    print()
    print(
        f"file: {path} ({requests:,} requests, {mb:,.1f} MB, {plan.total.input_tokens:,} "
        f"input tokens)"
    )
    print(f"machine: {machine()}; commit {git_commit()}")
    print(f"{'':40}{'median s':>10}{'requests/s':>13}{'MB/s':>9}  runs (s)")
    labels = {
        "a": "(a) raw tiktoken, encode_ordinary loop",
        "a2": "(a2) raw, encode_ordinary_batch x2",
        "a3": "(a3) raw, joined texts, 1 call/chunk",
        "b": "(b) price_job",
    }
    for key, label in labels.items():
        if key in med:
            shown = ", ".join(f"{x:.2f}" for x in times[key])
            t = med[key]
            print(f"{label:40}{t:10.2f}{requests / t:13,.0f}{mb / t:9.1f}  {shown}")
    print(
        f"peak RSS of pricing: {rss_price / 2**20:,.1f} MiB (process total after run 1; "
        f"{(rss_price - rss_before) / 2**20:,.1f} MiB added by the pricing pass itself)"
    )
    print(
        f"peak RSS of the whole benchmark: {peak_rss_bytes() / 2**20:,.1f} MiB (the prepass "
        "holds every text in memory)"
    )
    ratio = med["a"] / med["b"]  # throughput ratio (b)/(a) over the same requests and bytes
    verdict = "meets" if ratio >= GOAL else "below"
    print(f"ratio (b)/(a): {ratio:.2f} ({verdict} the goal of {GOAL:.2f})")
    print(f"ratio (b)/(a3): {med['a3'] / med['b']:.2f} (raw called the way price_job calls it)")
    if "a2" in med:
        print(f"ratio (b)/(a2): {med['a2'] / med['b']:.2f} (raw on two threads)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests to generate")
    parser.add_argument("--keep", metavar="FILE", help="job file to reuse, or to write and keep")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side (median)")
    parser.add_argument("--mix", default="chat", help="endpoints: chat,responses,embeddings")
    parser.add_argument("--prompt-words", type=int, default=40, help="words per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-batch-baseline",
        dest="batch_baseline",
        action="store_false",
        help="skip (a2), encode_ordinary_batch(num_threads=2), about 10x slower than (a)",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.repeat < 1:
        parser.error("--requests and --repeat must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
