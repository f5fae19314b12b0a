"""The search over a Space: each knob alone by bisection (its limit), then the knobs together by greedy ascent
from the exact point (and from the space's known-good ``starts`` that are inside the budget), one notch of one knob
at a time, always to the neighbour that buys the most speed per share of the budget; it stops where every next
notch leaves the budget. Points are evaluated through ``evaluate``, which caches them, so a point
reached twice costs once and a resumed search replays its cache."""
from __future__ import annotations

import math
from collections.abc import Callable

from ditfx.tuning.space import Space

# the smallest rise in budget usage a step is charged: free gains rank first, among themselves by gain
USAGE_STEP = 0.02
Evaluate = Callable[[Space, tuple[int, ...]], dict]  # -> a record with "inside" and "speed"


def _with(point: tuple[int, ...], j: int, i: int) -> tuple[int, ...]:
    return point[:j] + (i,) + point[j + 1:]


def knob_limits(space: Space, evaluate: Evaluate) -> dict[str, int]:
    """Per knob, the index of its most aggressive value inside the budget with the other knobs exact (bisection:
    quality is assumed to fall along a knob)."""
    origin = (0,) * len(space.knobs)
    limits = {}
    for j, knob in enumerate(space.knobs):
        inside, outside = 0, len(knob.values)  # the exact value is inside by definition
        while outside - inside > 1:
            mid = (inside + outside) // 2
            if evaluate(space, _with(origin, j, mid))["inside"]:
                inside = mid
            else:
                outside = mid
        limits[knob.name] = inside
    return limits


def ascend(space: Space, evaluate: Evaluate, start: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Greedy ascent over the knobs together from ``start`` (the exact point by default, else a point inside the
    budget); returns the last point reached (inside the budget).

    Each step takes the neighbour with the most speed bought per share of the budget spent (the gain in log speed
    over the rise in ``usage``, the largest fraction of any bound's allowance used), so no knob spends the whole
    budget before the others have had their cheap gains."""
    point = start if start is not None else (0,) * len(space.knobs)
    here = evaluate(space, point) if any(point) else {"speed": 1.0, "usage": 0.0}
    while True:
        moves = [_with(point, j, i + 1) for j, i in enumerate(point) if i + 1 < len(space.knobs[j].values)]
        inside = [(evaluate(space, m), m) for m in moves]
        inside = [(r, m) for r, m in inside if r["inside"]]
        if not inside:
            return point

        def rate(rm, here=here):
            r, m = rm
            gain = math.log(max(r["speed"], 1e-9) / max(here["speed"], 1e-9))
            # among equal rates the least aggressive (a technique that buys nothing stays off)
            return gain / max(r["usage"] - here["usage"], USAGE_STEP), -sum(m)

        here, point = max(inside, key=rate)


def search(space: Space, evaluate: Evaluate) -> dict:
    """Both phases on ``space``: ``{"limits": {knob: value alone}, "reached": point values, "space": the variant
    kept, "variants": {variant: its limits}}``.
    With choices, each is tried with every knob alone; the one whose fastest single-knob point is fastest (the
    first among equals) is kept for the ascent."""
    best, variants = None, {}
    for sub in space.variants():
        limits = knob_limits(sub, evaluate)
        variants[sub.name] = {k.name: k.values[limits[k.name]] for k in sub.knobs}
        alone = [_with((0,) * len(sub.knobs), j, limits[k.name]) for j, k in enumerate(sub.knobs)]
        speed = max(evaluate(sub, p)["speed"] if any(p) else 1.0 for p in alone)
        if best is None or speed > best[0] + 1e-9:
            best = (speed, sub, limits)
    _, sub, limits = best
    if len(sub.knobs) == 1:
        reached = (limits[sub.knobs[0].name],)
    else:
        ends = [ascend(sub, evaluate)]
        for values in sub.starts:  # known configurations: climbed from when inside the budget
            start = sub.point(values)
            if evaluate(sub, start)["inside"]:
                ends.append(ascend(sub, evaluate, start))
        reached = max(ends, key=lambda p: evaluate(sub, p)["speed"] if any(p) else 1.0)
    return {"limits": variants[sub.name], "reached": sub.values(reached), "space": sub.name,
            "variants": variants}


def pareto_front(records: list[dict], qualities: list[tuple[str, int]]) -> list[dict]:
    """The records no other record beats on speed and every quality (name, +1 higher is better / -1 lower)."""
    def vector(r):
        return [r["speed"]] + [sign * r["quality"].get(name, float("-inf") * sign) for name, sign in qualities]

    vectors = [vector(r) for r in records]
    front = []
    for r, v in zip(records, vectors):
        dominated = any(all(a >= b for a, b in zip(w, v)) and any(a > b for a, b in zip(w, v)) for w in vectors)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: -r["speed"])
