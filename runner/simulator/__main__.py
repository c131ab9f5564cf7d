"""``python -m runner.simulator``: the same command as ``batchrun simulate``."""

from .cli import simulate

simulate(prog_name="python -m runner.simulator")
