"""How long one engine step takes, as a function of what it runs.

A step's time is modelled as

    t = dense(T) + read * C + tree * V + draft(D) + offset

with T the tokens in the step, C the keys read (each sequence's context, read once for all
of its queries: a tree's extra tokens add their own keys, not another pass over the
context), V the sequences that verify a tree (a tree costs more than its tokens: masks,
another attention group), D the sequences whose heads draft a tree for the next step, and
dense(T) a piecewise-linear curve over token counts. dense, the cost per key read, per tree
and of drafting are measured at start-up on the actual hardware (`server.loading`), so the
model's marginal costs (what one more tree token or one more draft costs) start from
controlled measurements. Real steps then move `offset`, a moving average of how far the
model is off: per-sequence overheads (bookkeeping, sampling) and a busier machine show up
there, at the current load. Where the real steps come in several sizes, each measured size
also learns how much more or less than that average its own steps are off (`shape`): a
start-up timing that a shared machine disturbed gets corrected by the steps the policy
actually runs, while sizes it never runs keep their measured cost, and steps of a single
size leave the marginal costs alone.
"""
from __future__ import annotations

import bisect

MEASURED_SIZES = (1, 2, 4, 8, 16, 32, 64, 256)  # small sizes too: the CPU curve bends early
OFFSET_WEIGHT = 0.1
SHAPE_WEIGHT = 0.05  # per measured size, scaled by how close a step's size is to it


class StepCostModel:
    def __init__(self, dense: dict[int, float], per_key: float = 0.0, per_tree: float = 0.0,
                 draft_fixed: float = 0.0, draft_per_seq: float = 0.0):
        """dense: seconds per forward by token count (at no context); per_key: seconds per
        key a sequence reads; per_tree: seconds per sequence verifying a tree, beyond its
        tokens; drafting D sequences costs draft_fixed + draft_per_seq * D seconds (nothing
        when D = 0)."""
        if not dense:
            raise ValueError("the cost model needs at least one measurement")
        self.xs = sorted(dense)
        self.ys = [dense[x] for x in self.xs]
        # more tokens never cost less; a stalled measurement is an upward spike, so the curve
        # is made monotone from the right (a spike at 1 token must not lift every size)
        for i in range(len(self.ys) - 2, -1, -1):
            self.ys[i] = min(self.ys[i], self.ys[i + 1])
        self.per_key = max(0.0, per_key)
        self.per_tree = max(0.0, per_tree)
        self.draft_fixed = max(0.0, draft_fixed)
        self.draft_per_seq = max(0.0, draft_per_seq)
        self.offset = 0.0
        self.shape = [0.0] * len(self.xs)   # per measured size: its steps' error beyond the offset

    def dense(self, num_tokens: int) -> float:
        """The measured curve at num_tokens, with what real steps taught each measured size."""
        xs, ys = self.xs, self.ys
        correction = self.correction(num_tokens)
        if num_tokens <= xs[0]:
            return ys[0] + correction
        if num_tokens >= xs[-1]:
            if len(xs) == 1:
                return ys[0] * num_tokens / xs[0] + correction
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return ys[-1] + slope * (num_tokens - xs[-1]) + correction
        i = bisect.bisect_right(xs, num_tokens)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0) + correction

    def correction(self, num_tokens: int) -> float:
        """What real steps of about this size taught the measured curve."""
        return sum(w * self.shape[i] for i, w in self._neighbours(num_tokens))

    def _neighbours(self, num_tokens: int) -> list[tuple[int, float]]:
        """The measured sizes around num_tokens and their interpolation weights."""
        xs = self.xs
        if num_tokens <= xs[0]:
            return [(0, 1.0)]
        if num_tokens >= xs[-1]:
            return [(len(xs) - 1, 1.0)]
        i = bisect.bisect_right(xs, num_tokens)
        f = (num_tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
        return [(i - 1, 1.0 - f), (i, f)]

    def least_slope(self, lo: int, hi: int) -> float:
        """The least that one more token costs anywhere between lo and hi tokens (never below
        zero): what any token added to a step of lo tokens costs at least (whatever else the
        step holds: more keys or trees only add to it)."""
        if hi <= lo:
            return 0.0
        points = [lo] + [x for x in self.xs if lo < x < hi] + [hi]
        costs = [self(x) for x in points]
        return max(0.0, min((c1 - c0) / (x1 - x0) for x0, x1, c0, c1 in zip(points, points[1:], costs, costs[1:])))

    def draft(self, num_drafts: int) -> float:
        return self.draft_fixed + self.draft_per_seq * num_drafts if num_drafts > 0 else 0.0

    def model(self, num_tokens: int, keys: int = 0, num_trees: int = 0, num_drafts: int = 0) -> float:
        """The measured part, without the running offset."""
        return self.dense(num_tokens) + self.per_key * keys + self.per_tree * num_trees + self.draft(num_drafts)

    def __call__(self, num_tokens: int, keys: int = 0, num_trees: int = 0, num_drafts: int = 0) -> float:
        base = self.model(num_tokens, keys, num_trees, num_drafts)
        return max(base + self.offset, 0.25 * base)

    def observe(self, num_tokens: int, keys: int, num_trees: int, num_drafts: int, seconds: float) -> None:
        """Move the offset towards a real step's distance from the measured model, and the
        measured sizes around the step's towards how much more than the offset it is off (a
        size whose steps are off by the average has nothing to learn)."""
        base = self.model(num_tokens, keys, num_trees, num_drafts) - self.correction(num_tokens)  # as measured
        residual = min(seconds - base, 2.0 * base)  # one stalled step must not steer the policy
        self.offset += OFFSET_WEIGHT * (residual - self.offset)
        for i, w in self._neighbours(num_tokens):
            self.shape[i] += SHAPE_WEIGHT * w * (residual - self.offset - self.shape[i])
