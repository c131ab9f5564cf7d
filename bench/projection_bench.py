"""How close ``price --sample`` comes to what the job really costs.

For each job shape (tests/jobgen.SHAPES) the whole job is run once against the simulator with
realistic output lengths (lognormal around a share of each limit), which gives the actual total
(the simulator is deterministic per body, so every run of the job costs the same). Then, for
each sample size and seed, the job is imported afresh, only the sample is sent, and the
projection is compared with the actual: its error, whether its 95% interval holds the actual,
and how wide the interval is (high / low).

Usage: python bench/projection_bench.py [--requests 3000] [--seeds 20] [--sizes 20,50,100,300]
       [--shapes summaries,labels] [--share 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner import Database, RunSettings, Sample, run_with, sample_with
from runner.money import format_usd
from runner.settings import Transport
from runner.simulator import SimConfig, SimulatorThread
from tests.jobgen import SHAPES, write_shaped_job

KEY = "sk-bench"
CAP = 10**15  # picodollars: $1,000, more than any shape costs


@dataclass(frozen=True)
class Trial:
    shape: str
    size: int
    seed: int
    actual: int
    total: int
    low: int
    high: int

    @property
    def error(self) -> float:
        return (self.total - self.actual) / self.actual

    @property
    def covered(self) -> bool:
        return self.low <= self.actual <= self.high

    @property
    def width(self) -> float:
        return self.high / self.low if self.low else float("inf")


def _settings(base_url: str, db: Path, **extra: object) -> RunSettings:
    return RunSettings(
        cap_pico=CAP, db=str(db), quiet=True, transport=Transport(base_url=base_url), **extra
    )  # type: ignore[arg-type]


async def actual_total(base_url: str, job: Path, workdir: Path) -> int:
    """What the whole job costs at sync prices, from a run of all of it."""
    db = workdir / "full.db"
    result = await run_with(_settings(base_url, db, jobfile=job), api_key=KEY)
    assert result.outcome.name == "COMPLETE", result.message
    assert result.job_status is not None
    return result.job_status.spend.settled_pico


async def trial(
    base_url: str, template: Path, job_id: int, workdir: Path, size: int, seed: int
) -> tuple[int, int, int]:
    """(total, low, high) projected at sync prices from a sample of ``size``."""
    db = workdir / f"s{size}-{seed}.db"
    shutil.copyfile(template, db)
    settings = _settings(base_url, db, job_id=job_id, sample=Sample(size=size, seed=seed))
    _, projection = await sample_with(settings, api_key=KEY)
    db.unlink()
    return projection.sync.total_pico, projection.sync.low_pico, projection.sync.high_pico


async def measure(
    shape: str, requests: int, sizes: Sequence[int], seeds: int, share: float, workdir: Path
) -> list[Trial]:
    job = workdir / f"{shape}.jsonl"
    write_shaped_job(job, requests, shape)
    template = workdir / f"{shape}.db"
    with Database(str(template)) as database:
        job_id = database.import_job(job, cap="1000").id
    with SimulatorThread(SimConfig(output_share=share)) as sim:
        actual = await actual_total(sim.base_url, job, workdir)
        trials = []
        for size in sizes:
            for seed in range(seeds):
                total, low, high = await trial(sim.base_url, template, job_id, workdir, size, seed)
                trials.append(Trial(shape, size, seed, actual, total, low, high))
    return trials


def summarize(trials: list[Trial]) -> list[str]:
    lines = [
        "| shape | sample | actual | mean abs error | worst error | covered | high/low median "
        "(max) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(t.shape, t.size) for t in trials}, key=lambda k: (k[0], k[1]))
    for shape, size in keys:
        group = [t for t in trials if t.shape == shape and t.size == size]
        errors = [abs(t.error) for t in group]
        widths = [t.width for t in group]
        lines.append(
            f"| {shape} | {size} | {format_usd(group[0].actual)} | "
            f"{statistics.mean(errors):.1%} | {max(errors):.1%} | "
            f"{sum(t.covered for t in group)}/{len(group)} | "
            f"{statistics.median(widths):.2f} ({max(widths):.2f}) |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sizes", default="20,50,100,300")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--share", type=float, default=0.3, help="median output / limit")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="projection-bench-") as tmp:
        for shape in args.shapes.split(","):
            trials += asyncio.run(
                measure(shape, args.requests, sizes, args.seeds, args.share, Path(tmp))
            )
    print("\n".join(summarize(trials)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
