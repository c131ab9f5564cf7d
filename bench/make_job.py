"""Write a large synthetic job file for benchmarks (the generator lives in tests/jobgen.py).

Usage: python bench/make_job.py OUT.jsonl --requests N [--seed S] [--prompt-words W]
       [--max-tokens M] [--mix chat,responses,embeddings] [--model gpt-4o-mini]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.jobgen import KINDS, write_job

__all__ = ["KINDS", "write_job"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic batchrun job file.")
    parser.add_argument("out", type=Path, help="output JSONL path")
    parser.add_argument("--requests", type=int, required=True, help="number of requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-words", type=int, default=40, help="words in each prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="output limit; 0 for none")
    parser.add_argument("--mix", default="chat", help="comma list of chat,responses,embeddings")
    parser.add_argument("--model", default="gpt-4o-mini", help="model for chat and responses")
    args = parser.parse_args(argv)
    if args.requests < 0 or args.prompt_words < 1 or args.max_tokens < 0:
        parser.error("--requests and --max-tokens must be >= 0, --prompt-words >= 1")
    mix = tuple(k.strip() for k in args.mix.split(",") if k.strip())
    try:
        write_job(
            args.out,
            args.requests,
            seed=args.seed,
            prompt_words=args.prompt_words,
            max_tokens=args.max_tokens,
            mix=mix,
            model=args.model,
        )
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:
        print(f"make_job: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
