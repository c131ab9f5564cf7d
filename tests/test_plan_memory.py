"""Pricing streams: a 100,000-request job is priced in well under 200 MB of peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from .jobgen import write_job

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 100_000
LIMIT_BYTES = 200 * 1000 * 1000  # 200 MB, the stricter reading (190.7 MiB)


# Peak RSS of the whole child process (interpreter, imports, both tokenizer vocabularies and the
# pricing pass), measured before and after pricing. On Linux it is VmHWM: ru_maxrss of a child
# started by subprocess (vfork + exec) starts at the *parent's* RSS, which under pytest already
# holds vocabularies and would be measured instead. Elsewhere, ru_maxrss (KiB; bytes on macOS).
_CHILD = textwrap.dedent(
    """\
    import json, resource, sys
    from runner.plan import price_job
    from runner.pricing import load_price_table
    from runner.vocab import get_encoding

    def peak():
        try:
            with open("/proc/self/status") as f:
                return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
        except (OSError, StopIteration):
            unit = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit

    table = load_price_table()
    get_encoding("o200k_base"), get_encoding("cl100k_base")  # the fixed cost, loaded up front
    before = peak()
    plan = price_job(sys.argv[1], table)
    print(json.dumps({"requests": plan.total.requests, "before": before, "peak": peak()}))
    """
)


def test_pricing_100k_requests_peaks_under_200_mb_and_grows_little(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    # all three endpoints, so both vocabularies (o200k and cl100k) are in memory
    write_job(path, REQUESTS, mix=("chat", "responses", "embeddings"), prompt_words=24)
    assert path.stat().st_size > 25 * 1024 * 1024

    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["requests"] == REQUESTS
    peak, grew = data["peak"], data["peak"] - data["before"]
    mib = 1024 * 1024
    assert peak < LIMIT_BYTES, f"peak RSS {peak / 1e6:.1f} MB"
    # Streaming: the pass itself adds the duplicate-id table and buffers, not the file (~30 MB).
    assert grew < 25 * mib, f"pricing grew RSS by {grew / mib:.1f} MiB"
