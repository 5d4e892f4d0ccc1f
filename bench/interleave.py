"""The in-process schedule: several points' timing rounds taken in rotation.

Each point is measured by a ``bench.measure.measure_steps`` generator: its
set-up (module, first call, memory, MACs) runs when it is admitted, then every
step times one slot of its rounds. Up to ``Settings.interleave`` points are held
at once (their tensors within ``interleave_mib``); one slot of the next point in
the rotation is timed per step, so the slots of one point are spread over the
time the others take, and a load burst that would have landed on all of one
point's samples lands on one slot of several points instead (where its probe
sees it, that slot is taken again). A point's record is yielded as soon as its
last slot is done, and the next point admitted: a killed sweep loses at most the
points in the rotation. Compiled and flex points are timed alone (the rotation
is drained before one is admitted): Dynamo is reset for each compiled point, and
flex attention's compiled kernel is shared by the process.

Progress goes through ``on_event(kind, data)`` as it happens (the sweep passes
it on, the CLI renders it; nothing here prints): ``setup`` {point_id, label (a
short name), active} when a point's set-up is done and it joins the rotation, ``slot``
{point_id, label, slot, active} when one of its timing slots is taken. A
point's record is what the caller stores.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from .measure import Settings, measure_steps, strict, timed_alone
from .points import Point

MIB = 1024 * 1024


Event = Callable[[str, dict[str, Any]], None]


def _ignore(kind: str, data: dict[str, Any]) -> None:
    pass


def _brief(point: Point) -> str:
    """A short name of the point for progress lines: mechanism, map, pass, impl (and compiled, cross)."""
    extra = (" compiled" if point.compile else "") + (" cross" if point.cross else "")
    return f"{point.mechanism} {point.height}x{point.width} {point.pass_} {point.impl}{extra}"


def _advance(steps: Generator[int, None, dict], point: Point | None = None) -> tuple[bool, Any]:
    """One step of a point: (True, bytes it holds) while it has slots left, else (False, its record)."""
    try:
        with strict(point):
            return True, next(steps)
    except StopIteration as done:
        return False, done.value


def interleaved(
    points: Iterable[Point],
    settings: Settings,
    clock: Callable[[], float] = time.perf_counter,
    on_event: Event | None = None,
) -> Iterator[dict[str, Any]]:
    """The records of ``points``, each yielded when its point is done (not in the points' order);
    ``on_event`` hears of each set-up and slot as it happens."""
    emit = on_event or _ignore
    pending = deque(points)
    active: deque[tuple[Generator[int, None, dict], int, Point, int]] = deque()  # steps, bytes, point, slots
    held = 0  # bytes of tensors the points in the rotation hold
    alone = False  # the rotation holds a point that is timed alone

    def admits() -> bool:
        if not pending:
            return False
        if not active:
            return True
        if alone or timed_alone(pending[0]):
            return False
        return len(active) < max(1, settings.interleave) and held < settings.interleave_mib * MIB

    while pending or active:
        while admits():
            point = pending.popleft()
            steps = measure_steps(point, settings, clock)
            going, value = _advance(steps, point)  # the set-up
            if not going:  # skipped or failed before timing
                yield value
                continue
            active.append((steps, value, point, 0))
            held += value
            alone = timed_alone(point)
            emit("setup", {"point_id": point.point_id, "label": _brief(point), "active": len(active)})
        if not active:
            continue
        steps, size, point, taken = active.popleft()
        going, value = _advance(steps, point)
        if going or value.get("status") == "ok":
            emit("slot", {"point_id": point.point_id, "label": _brief(point), "slot": taken + 1, "active": len(active)})
        if going:
            active.append((steps, size, point, taken + 1))
        else:
            held -= size
            alone = False
            yield value
