"""The results store loses nothing: records are validated on read, a valid last line
without its newline is kept, a run directory is locked while a sweep writes it, a
sweep of another grid or settings is refused unless appended, a missing env.json is
an error, and a change of code revision measures again unless --resume reuses."""

from __future__ import annotations

import json
import re

import attnbench.bench.env as env_module
import pytest
from attnbench.bench import rundir, store
from attnbench.bench.env import env_differences
from attnbench.bench.executors import InProcess
from attnbench.bench.measure import Settings
from attnbench.bench.points import Grid, expand
from attnbench.bench.sweep import run_sweep

FAST = Settings(cpu_min_run_time=0.01, min_samples=3, timeout_s=30.0, threads=1)


class Instant(InProcess):
    """Records each point as measured at once (the store is under test, not the timing); counts what it ran."""

    name = "instant"

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, points, settings):
        for p in points:
            self.ran.append(p.point_id)
            yield {**p.to_json(), "status": "ok", "reason": None, "latency_ms_median": 1.0, "threads": 1}


def grid(*resolutions: str) -> Grid:
    return Grid(mechanisms=["full"], resolutions=list(resolutions or ("4", "6")), dims=[8], devices=["cpu"])


def sweep(out, g: Grid | None = None, settings: Settings = FAST, **kw):
    ex = Instant()
    events: list[tuple[str, dict]] = []
    run_sweep(g or grid(), out, settings, executor=ex, on_event=lambda k, d: events.append((k, d)), **kw)
    warnings = [d["message"] for k, d in events if k == "warning"]
    return ex.ran, warnings


def lines(run) -> list[str]:
    return (run / store.RESULTS).read_text().splitlines()


def test_a_record_that_does_not_fit_the_schema_is_reported_skipped_and_measured_again(tmp_path):
    run = tmp_path / "r"
    ran, _ = sweep(run)
    assert len(ran) == 2
    first, second = (json.loads(x) for x in lines(run))
    bad = {**second, "height": "abc"}
    (run / store.RESULTS).write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
    rep = store.read_results(run)
    assert [r["point_id"] for r in rep.records] == [first["point_id"]]
    assert rep.invalid and rep.invalid[0][0] == 2 and "height must be int" in rep.invalid[0][1]
    df = store.load(run)  # never fatal
    assert len(df) == 1 and any("line 2" in m and "height" in m for m in df.attrs["corrupt"])
    ran, warnings = sweep(run)
    assert ran == [second["point_id"]]  # not counted as done
    assert any("line 2 is not a valid record" in w for w in warnings)
    assert len(store.load(run)) == 2


@pytest.mark.parametrize(
    "field, value, why",
    [("point_id", None, "missing"), ("status", "fine", "status must be one of"), ("knobs", [1], "knobs must be")],
)
def test_every_declared_field_is_checked(field, value, why):
    point = expand(grid("4")).points[0]
    rec = {**point.to_json(), "status": "ok", field: value}
    assert any(why in p for p in store.problems(rec))
    assert store.problems({**point.to_json(), "status": "ok", "latency_samples_ms": [1.0, 2]}) == []
    assert store.problems({**point.to_json(), "status": "ok", "latency_samples_ms": ["x"]})


def test_a_line_holding_only_a_point_id_is_not_done(tmp_path):
    run = tmp_path / "r"
    sweep(run)
    first, second = (json.loads(x) for x in lines(run))
    (run / store.RESULTS).write_text(json.dumps(first) + "\n" + json.dumps({"point_id": second["point_id"]}) + "\n")
    rep = store.read_results(run)
    assert len(rep.records) == 1 and rep.invalid[0][0] == 2 and "missing status" in rep.invalid[0][1]
    ran, _ = sweep(run)
    assert ran == [second["point_id"]]


def test_a_valid_last_record_without_its_newline_is_kept(tmp_path):
    run = tmp_path / "r"
    sweep(run)
    path = run / store.RESULTS
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    rep = store.read_results(run)
    assert len(rep.records) == 2 and not rep.corrupt and not rep.invalid
    ran, warnings = sweep(run)
    assert ran == [] and warnings == []  # both count as done, nothing reported
    assert not (run / store.CORRUPT).exists()
    assert path.read_bytes().endswith(b"\n") and len(lines(run)) == 2
    ran, _ = sweep(run, grid("4", "6", "8"), append=True)  # appends start on a clean line
    assert len(ran) == 1 and len(store.read_results(run).records) == 3


def test_a_cut_short_last_line_is_moved_aside(tmp_path):
    run = tmp_path / "r"
    sweep(run)
    path = run / store.RESULTS
    keep = lines(run)[0]
    path.write_text(keep + "\n" + '{"point_id": "x", "sta')
    ran, warnings = sweep(run)
    assert len(ran) == 1 and any("trailing line 2" in w for w in warnings)
    assert (run / store.CORRUPT).read_text() == '{"point_id": "x", "sta\n'
    assert len(store.read_results(run).records) == 2


def test_a_run_directory_is_locked_while_a_sweep_writes_it(tmp_path):
    run = tmp_path / "r"
    with rundir.RunDir(run, "sweep").claim():
        with pytest.raises(store.StoreError) as err:
            sweep(run)
        assert re.search(r"another sweep \(pid \d+ on \S+ since \d{4}-\d\d-\d\dT", str(err.value))
        assert not (run / store.RESULTS).exists() and not (run / store.ENV).exists()
    assert not (run / rundir.LOCK).exists()
    ran, _ = sweep(run)  # released: the next sweep measures
    assert len(ran) == 2


def test_two_sweeps_into_one_directory_do_not_both_measure(tmp_path):
    run = tmp_path / "r"
    inner: list = []

    class Nested(Instant):
        def run(self, points, settings):
            # a second sweep starts while the first is writing
            with pytest.raises(store.StoreError, match="being written by another sweep"):
                run_sweep(grid(), run, FAST, executor=Instant())
            inner.append(True)
            yield from super().run(points, settings)

    ex = Nested()
    run_sweep(grid(), run, FAST, executor=ex)
    assert inner and len(ex.ran) == 2
    ids = [r["point_id"] for r in store.read_results(run).records]
    assert len(ids) == len(set(ids)) == 2


def test_a_sweep_of_another_grid_or_settings_is_refused_unless_appended(tmp_path):
    run = tmp_path / "r"
    sweep(run, grid("4"))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(store.StoreError, match=r"another grid.*resolutions: \['4'\] there, \['4', '8'\] now.*--append"):
        sweep(run, grid("4", "8"))
    other = Settings(cpu_min_run_time=0.05, min_samples=3, timeout_s=30.0, threads=1)
    with pytest.raises(store.StoreError, match="cpu_min_run_time: 0.01 there, 0.05 now"):
        sweep(run, grid("4"), settings=other)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # refused: nothing written
    # a longer time limit is not a measurement setting
    ran, _ = sweep(run, grid("4"), settings=Settings(cpu_min_run_time=0.01, min_samples=3, timeout_s=99, threads=1))
    assert ran == []
    ran, _ = sweep(run, grid("4", "8"), append=True)
    assert len(ran) == 1
    saved = json.loads((run / store.SWEEP).read_text())
    assert saved["grid"]["resolutions"] == ["4"] and saved["appended"][0]["grid"]["resolutions"] == ["4", "8"]


def test_results_without_their_env_json_are_an_error(tmp_path):
    run = tmp_path / "r"
    sweep(run)
    (run / store.ENV).unlink()
    with pytest.raises(store.StoreError, match="holds results but no env.json"):
        sweep(run)
    assert not (run / store.ENV).exists()


def test_a_change_of_code_revision_measures_again_unless_resumed(tmp_path, monkeypatch):
    run = tmp_path / "r"

    def at(revision: str) -> None:
        state = {"git_rev": revision, "git_dirty": False, "revision": revision}
        monkeypatch.setattr(env_module, "git_state", lambda: state)

    at("aaaa")
    ran, _ = sweep(run)
    assert len(ran) == 2 and {r["revision"] for r in store.read_results(run).records} == {"aaaa"}
    ran, warnings = sweep(run)
    assert ran == [] and warnings == []
    at("bbbb")
    ran, warnings = sweep(run)
    assert len(ran) == 2
    assert any("code changed" in w and "2 by aaaa; now bbbb" in w and "--resume" in w for w in warnings)
    df = store.load(run)
    assert len(df) == 2 and set(df["revision"]) == {"bbbb"}  # the newest measurement of each point
    at("cccc")
    ran, warnings = sweep(run, resume=True)
    # counted by each point's newest record: the points, not the records of older revisions
    assert ran == [] and any("reusing" in w and "(2 by bbbb; now cccc)" in w and "--resume" in w for w in warnings)


def test_one_comparability_rule():
    env = {"torch": "2.13.0", "threads": 1, "cpu_model": "x", "time": "t1", "git_rev": "a", "hostname": "h1"}
    assert env_differences(env, {**env, "time": "t2", "git_rev": "b", "hostname": "h2", "platform": "p"}) == []
    assert env_differences(env, {**env, "threads": 2, "torch": "2.11.0"}) == ["torch", "threads"]


def _no_space(*_args):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_write_that_fails_leaves_the_stored_records_as_they_were(tmp_path, monkeypatch):
    import os

    s = store.ResultsStore(tmp_path)
    s.append({"a": 1})
    before = s.path.read_bytes()
    real_write = os.write

    def half(fd, data):  # the disk fills up in the middle of the line
        real_write(fd, bytes(data[: len(data) // 2]))
        _no_space()

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(store.WriteError, match=r"cannot write .*results.jsonl: \[Errno 28\] No space left"):
        s.append({"b": "x" * 100})
    assert s.path.read_bytes() == before
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(store.WriteError):
        s.append({"c": 3})
    with pytest.raises(store.WriteError, match="env.json"):
        store.write_atomic(tmp_path / "env.json", "{}")
    assert s.path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_integers_beyond_64_bits_and_an_env_that_is_not_an_object_are_refused_when_read(tmp_path):
    lines = [{"point_id": "p", "status": "ok", "kind": "match", "mechanism": "m", "seed": 0, "height": 8, "width": 8}]
    lines += [{**lines[0], "height": 2**63}, {**lines[0], "width": -(10**400)}, {**lines[0], "seed": 2**62}]
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"point_id": ' + "9" * 5000 + "}\n"
    (tmp_path / store.RESULTS).write_text(text)
    report = store.read_results(tmp_path)
    assert len(report.records) == 2 and [n for n, _ in report.invalid] == [2, 3]
    assert "height must be int, got an integer of 64 bits" in report.invalid[0][1]
    assert [n for n, _ in report.corrupt] == [5]  # longer than Python reads as a number
    (tmp_path / store.ENV).write_text("[1, 2]")
    with pytest.raises(store.StoreError, match="holds a JSON list, not an object"):
        store.load(tmp_path)
