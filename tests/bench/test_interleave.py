"""The in-process schedule: points' timing slots in rotation, compiled points alone, bounded memory."""

from __future__ import annotations

import pytest
from attnbench.bench import measure as m
from attnbench.bench.interleave import interleaved
from attnbench.bench.measure import Settings, _Budget
from attnbench.bench.points import Grid, expand

FAST = dict(cpu_min_run_time=0.003, min_samples=3, remeasure=0, count_flops=False, compile_backend="eager")


@pytest.fixture
def slots(monkeypatch):
    """The point_id of every timing slot, in the order the slots were taken."""
    order: list[str] = []
    real = m._Timing.slot

    def slot(self):
        order.append(self.point.point_id)
        real(self)

    monkeypatch.setattr(m._Timing, "slot", slot)
    monkeypatch.setattr(m, "probe_ms", lambda device: 1.0)
    monkeypatch.setattr(m, "_REFERENCE", {})
    return order


def _points(**grid):
    base = {"mechanisms": ["full"], "resolutions": ["8", "12", "16"], "dims": [16], "heads": [2], "passes": ["fwd"]}
    return expand(Grid.from_dict({**base, **grid})).points


def _runs(order: list[str]) -> list[tuple[str, int]]:
    """Consecutive slots of one point collapsed: (point_id, count)."""
    out: list[tuple[str, int]] = []
    for pid in order:
        if out and out[-1][0] == pid:
            out[-1] = (pid, out[-1][1] + 1)
        else:
            out.append((pid, 1))
    return out


def test_slots_of_several_points_are_taken_in_rotation(slots):
    points = _points()
    records = list(interleaved(points, Settings(**FAST, rounds=3, interleave=8)))
    ids = [p.point_id for p in points]
    assert sorted(r["point_id"] for r in records) == sorted(ids) and all(r["status"] == "ok" for r in records)
    assert slots == ids * 3  # one slot of each point per turn of the rotation
    assert all(r["latency_rounds"] and len(r["latency_rounds"]) == 3 for r in records)


def test_progress_events_tell_each_set_up_and_slot_as_the_rotation_takes_them(slots):
    """The rotation reports every point's set-up and every slot when it happens, before the records
    come out: read in order, the events interleave set-ups, slots and finished records."""
    points = _points()
    seen: list[tuple[str, str]] = []
    records = []
    for rec in interleaved(
        points, Settings(**FAST, rounds=3, interleave=8), on_event=lambda kind, d: seen.append((kind, d["point_id"]))
    ):
        seen.append(("record", rec["point_id"]))
        records.append(rec)
    ids = [p.point_id for p in points]
    assert [pid for kind, pid in seen if kind == "setup"] == ids
    assert [pid for kind, pid in seen if kind == "slot"] == slots == ids * 3
    # each point's set-up comes before its slots, its three slots before its record
    for pid in ids:
        mine = [kind for kind, p in seen if p == pid]
        assert mine == ["setup", "slot", "slot", "slot", "record"]
    # the first slot is reported before any record: progress is not held back until points finish
    assert seen.index(("slot", ids[0])) < min(seen.index(("record", pid)) for pid in ids)


def test_interleave_one_times_each_point_on_its_own(slots):
    points = _points()
    list(interleaved(points, Settings(**FAST, rounds=3, interleave=1)))
    assert _runs(slots) == [(p.point_id, 3) for p in points]


def test_memory_bound_limits_the_rotation(slots):
    # no room for tensors: each point is admitted only when the rotation is empty
    points = _points()
    list(interleaved(points, Settings(**FAST, rounds=2, interleave=8, interleave_mib=0.0)))
    assert _runs(slots) == [(p.point_id, 2) for p in points]


def test_a_compiled_point_is_timed_alone(slots):
    eager = _points(resolutions=["8", "16"])
    compiled = _points(resolutions=["12"], compile=[True])
    points = [eager[0], compiled[0], eager[1]]
    records = list(interleaved(points, Settings(**FAST, rounds=2, interleave=8)))
    assert {r["point_id"]: r["status"] for r in records} == {p.point_id: "ok" for p in points}
    # the compiled point's slots are consecutive: the rotation was drained before it and refilled after
    assert _runs(slots) == [(points[0].point_id, 2), (points[1].point_id, 2), (points[2].point_id, 2)]
    assert next(r for r in records if r["compile"])["provenance"]["compile"]["graphs"] >= 1


def test_a_point_that_cannot_run_does_not_stop_the_rotation(slots):
    # a window of 7 fits none of these maps: skipped at set-up, the others are measured
    points = _points(mechanisms=["swin", "full"], cost_knob_values={"window": [7]})
    records = list(interleaved(points, Settings(**FAST, rounds=2, interleave=8)))
    status = {(r["mechanism"], r["height"]): r["status"] for r in records}
    assert len(records) == len(points) and {s for (mech, _), s in status.items() if mech == "swin"} == {"skipped"}
    assert {s for (mech, _), s in status.items() if mech == "full"} == {"ok"}
    assert len(slots) == 2 * sum(p.mechanism == "full" for p in points)


def test_budget_counts_only_the_points_own_time():
    now = [0.0]
    budget = _Budget(10.0, lambda: now[0])
    now[0] = 3.0
    budget.pause()
    now[0] = 100.0  # other points' slots: not this point's time
    assert budget.elapsed() == 3.0 and budget.remaining() == 7.0
    budget.resume()
    now[0] = 105.0
    assert budget.elapsed() == 8.0
    now[0] = 108.0
    with pytest.raises(m.PointTimeout):
        budget.check("timing")
