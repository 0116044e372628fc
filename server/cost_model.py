"""How long one engine step takes as a function of the tokens it runs.

Measured at start-up on the actual hardware (a few forwards of growing size) and refreshed
from every real step, so the speculation policy can weigh bigger trees against their cost.
"""
from __future__ import annotations

import bisect

MEASURED_SIZES = (1, 2, 4, 8, 16, 32, 64, 256)  # small sizes too: the CPU curve bends early


class StepCostModel:
    """Piecewise-linear seconds-per-step over token-count buckets, updated by moving average."""

    def __init__(self, measured: dict[int, float]):
        if not measured:
            raise ValueError("the cost model needs at least one measurement")
        self.points = dict(sorted(measured.items()))
        self._refresh()

    def _refresh(self) -> None:
        self.xs = list(self.points)
        self.ys = [self.points[x] for x in self.xs]
        # keep the curve non-decreasing: more tokens never cost less
        for i in range(1, len(self.ys)):
            self.ys[i] = max(self.ys[i], self.ys[i - 1])

    def __call__(self, num_tokens: int) -> float:
        xs, ys = self.xs, self.ys
        if num_tokens <= xs[0]:
            return ys[0]
        if num_tokens >= xs[-1]:
            if len(xs) == 1:
                return ys[0] * num_tokens / xs[0]
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return ys[-1] + slope * (num_tokens - xs[-1])
        i = bisect.bisect_right(xs, num_tokens)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)

    def observe(self, num_tokens: int, seconds: float, weight: float = 0.1) -> None:
        """Nudge the measured points around num_tokens towards a real step's duration."""
        ratio = seconds / max(self(num_tokens), 1e-9)
        factor = 1.0 + weight * (min(ratio, 4.0) - 1.0)
        i = bisect.bisect_left(self.xs, num_tokens)
        exact = i < len(self.xs) and self.xs[i] == num_tokens
        for j in {i} if exact else {max(i - 1, 0), min(i, len(self.xs) - 1)}:
            self.points[self.xs[j]] *= factor
        self._refresh()
