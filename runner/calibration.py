"""What a server's bills taught about how it counts tokens, and the scale the cap reserves at.

A server with its own tokenizer (vLLM, llama.cpp, a proxy in front of another provider) bills
more, or fewer, input tokens than tiktoken counts, and some run past the output limit. Each
model's calibration keeps the largest ratio seen of billed to expected tokens, for input
(billed / counted) and output (billed / the output limit). Requests still to send are reserved
at their worst case times the larger of the two, plus a margin; a ratio above ``most`` is no
calibration at all (a stored conversation billed as input) and stops the run.

Ratios are integers of parts per million (ppm), rounded up, so the scale never under-reserves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .settings import Calibrating

PPM = 1_000_000


def ratio_ppm(billed: int, expected: int) -> int:
    """``billed / expected`` in parts per million, rounded up (0 when nothing was expected)."""
    if expected <= 0:
        return 0
    return -(-billed * PPM // expected)


def scale_of(input_ppm: int, output_ppm: int, margin: float) -> int:
    """The reservation scale (ppm) for a model whose largest ratios seen are these: 1x while
    the server bills no more than counted and allowed, else the larger ratio plus the margin."""
    worst = max(input_ppm, output_ppm)
    if worst <= PPM:
        return PPM
    return -(-worst * round(margin * PPM + PPM) // PPM)


@dataclass(slots=True)
class ModelCalibration:
    """One model's largest ratios seen, over ``results`` results."""

    input_ppm: int = 0  # billed input / counted input (counted x the price file's input_factor)
    output_ppm: int = 0  # billed output / output limit
    results: int = 0

    @property
    def over_limit(self) -> bool:
        """Whether any output ran past its limit."""
        return self.output_ppm > PPM

    def describe(self, model: str) -> str | None:
        """A line for ``status`` and the report, or None while the server counts as batchrun."""
        parts = []
        if self.input_ppm > PPM or (self.results and 0 < self.input_ppm < PPM * 99 // 100):
            ratio = self.input_ppm / PPM
            parts.append(f"server counts {ratio:.2f}x the input tokens batchrun counted")
        if self.over_limit:
            parts.append(f"output ran to {self.output_ppm / PPM:.2f}x its limit")
        if not parts:
            return None
        return f"{model}: {', '.join(parts)} (largest of {self.results:,} result(s))"


class Calibration:
    """Per-model calibration of one run, seeded from the job's stored results."""

    def __init__(self, settings: Calibrating | None = None) -> None:
        self.settings = settings or Calibrating()
        self.models: dict[str, ModelCalibration] = {}
        self._scale: dict[str, int] = {}

    def seed(self, seen: Mapping[str, ModelCalibration]) -> None:
        for model, cal in seen.items():
            self.models[model] = ModelCalibration(cal.input_ppm, cal.output_ppm, cal.results)
            self._rescale(model)

    def learn(
        self, model: str, *, expected_input: int, output_limit: int, billed_input: int,
        billed_output: int,
    ) -> int:  # fmt: skip
        """Take in one result; returns its own largest ratio (ppm)."""
        cal = self.models.get(model)
        if cal is None:
            cal = self.models[model] = ModelCalibration()
        cal.results += 1
        r_in = ratio_ppm(billed_input, expected_input)
        r_out = ratio_ppm(billed_output, output_limit)
        if r_in > cal.input_ppm or r_out > cal.output_ppm:
            cal.input_ppm = max(cal.input_ppm, r_in)
            cal.output_ppm = max(cal.output_ppm, r_out)
            self._rescale(model)
        return max(r_in, r_out)

    def honest(self, ratio: int) -> bool:
        """Whether a ratio can be calibrated for (else the run stops)."""
        return ratio <= round(self.settings.most * PPM)

    def _rescale(self, model: str) -> None:
        cal = self.models[model]
        if self.honest(max(cal.input_ppm, cal.output_ppm)):
            self._scale[model] = scale_of(cal.input_ppm, cal.output_ppm, self.settings.margin)

    def scale(self, model: str) -> int:
        """The scale (ppm) to reserve ``model``'s requests at."""
        return self._scale.get(model, PPM)

    def scales(self) -> dict[str, int]:
        """Every model whose reservations are scaled, for a claim."""
        return {m: s for m, s in self._scale.items() if s != PPM}

    def lines(self) -> Iterable[str]:
        for model in sorted(self.models):
            line = self.models[model].describe(model)
            if line:
                yield line


def scaled(worst_pico: int, scale: int) -> int:
    """A worst case reserved at ``scale`` (ppm), rounded up."""
    if scale == PPM:
        return worst_pico
    return -(-worst_pico * scale // PPM)
