"""Every bad input gets one line saying what to change, exit status 2, no traceback and nothing written."""

from __future__ import annotations

import errno
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from attnbench.bench.points import Grid, expand
from typer.testing import CliRunner

from attnbench import cli

TRAIN = ["train", "-m", "pyramid_full", "--tiny", "--train-size", "8", "--val-size", "8", "--batch", "8"]


def run_dir(tmp: Path) -> None:
    """A run directory holding one stored point of full attention."""
    point = expand(Grid(mechanisms=["full"], resolutions=["4"], dims=[8], devices=["cpu"])).points[0]
    (tmp / "run").mkdir()
    (tmp / "run" / "env.json").write_text(json.dumps({"torch": torch.__version__}))
    rec = {**point.to_json(), "status": "ok", "latency_ms_median": 1.0, "peak_bytes": 100}
    (tmp / "run" / "results.jsonl").write_text(json.dumps(rec) + "\n")


def trained(checkpoint: Callable[[Path], None]) -> Callable[[Path], None]:
    """A training run directory that the same command would continue, but for its checkpoint."""

    def setup(tmp: Path) -> None:
        import dataclasses

        from attnbench.studies.train import TRAIN_JSON, TrainConfig

        d = tmp / "t"
        d.mkdir()
        made = TrainConfig("pyramid_full", "t", tiny=True, resolution=32, batch=8, train_size=8, val_size=8)
        config = dataclasses.asdict(made)
        (d / TRAIN_JSON).write_text(json.dumps({"config": config, "status": "interrupted"}))
        checkpoint(d / "checkpoint.pt")

    return setup


def truncated(path: Path) -> None:
    torch.save({"epoch": 1, "step": 1, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])


class Payload:
    def __reduce__(self):  # unpickling would call os.getcwd: weights_only must refuse it
        return (os.getcwd, ())


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


def swept(tmp: Path) -> None:
    """run_dir, its env.json this machine's fingerprint (so that a sweep may add to it)."""
    from attnbench.bench.env import fingerprint

    run_dir(tmp)
    (tmp / "run" / "env.json").write_text(json.dumps(fingerprint(threads=1)))


def stored(field: str, value: object, env: object = None) -> Callable[[Path], None]:
    """A run directory whose one record holds ``field: value`` (and whose env.json holds ``env``, if given)."""

    def setup(tmp: Path) -> None:
        run_dir(tmp)
        rec = json.loads((tmp / "run" / "results.jsonl").read_text())
        (tmp / "run" / "results.jsonl").write_text(json.dumps({**rec, field: value}) + "\n")
        if env is not None:
            (tmp / "run" / "env.json").write_text(json.dumps(env))

    return setup


def disk_full(setup: Callable[[Path], None] | None) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """``setup``, then every fsync fails as on a full disk (the data written before it is not durable)."""

    def full(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        if setup is not None:
            setup(tmp)

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)

    return full


def read_only(setup: Callable[[Path], None] | None, folder: str) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """``setup``, then ``folder`` made read-only: chmod 0o500, and where that binds nobody (root), every
    open for writing and every new folder under it refused as the kernel would (EACCES)."""

    def setup_ro(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import builtins

        if setup is not None:
            setup(tmp)
        target = tmp / folder
        target.mkdir(exist_ok=True)
        target.chmod(0o500)
        if not os.access(target, os.W_OK):
            return
        inside = str(target.resolve()) + os.sep

        def refuse(path: object) -> None:
            if os.path.abspath(os.fspath(path)).startswith(inside):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def open_(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202 - open's signature
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202
            if flags & writing:
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):  # noqa: ANN001, ANN202
            refuse(os.path.join(path, ""))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)

    return setup_ro


def plugin(source: str | None) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """ATTNBENCH_PLUGINS naming a module of this ``source`` (None: a module that does not exist)."""

    def setup(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import importlib

        name = f"plugin_{abs(hash((source, str(tmp)))):x}"
        if source is not None:
            (tmp / "plugins").mkdir()
            (tmp / "plugins" / f"{name}.py").write_text(source)
            monkeypatch.syspath_prepend(str(tmp / "plugins"))
            importlib.invalidate_caches()
        monkeypatch.setenv("ATTNBENCH_PLUGINS", name)

    return setup


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels (PIL reads the size from the header alone)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bomb_folder(tmp: Path) -> None:
    """An image folder of two classes, one image of which is over PIL's pixel limit."""
    from PIL import Image

    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp / "imgs" / cls / "small.png")
    (tmp / "imgs" / "a" / "huge.png").write_bytes(png_header(100_000, 100_000))


EXPERIMENT = (Path(__file__).resolve().parents[1] / "experiments" / "dat_placement.yaml").read_text()
ALIAS_BOMB = "".join(f"  {b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))


def experiment(edit: Callable[[str], str] | bytes) -> Callable[[Path], None]:
    """A copy of a shipped experiment as exp.yaml, edited (or these bytes instead)."""

    def setup(tmp: Path) -> None:
        path = tmp / "exp.yaml"
        if isinstance(edit, bytes):
            path.write_bytes(edit)
        else:
            text = edit(EXPERIMENT)
            assert text != EXPERIMENT
            path.write_text(text)

    return setup


def reproduce(*more: str) -> list[str]:
    return ["reproduce", "exp.yaml", "--smoke", "--out", "o", *more]


CASES: dict[str, tuple[list[str], Callable[[Path], None] | None, str]] = {
    "config-missing": (["sweep", "--config", "nope.yaml", "--out", "o"], None, "no such file"),
    "config-directory": (["sweep", "--config", "cfg", "--out", "o"], lambda t: (t / "cfg").mkdir(), "directory"),
    "config-malformed": (["sweep", "--config", "bad.yaml", "--out", "o"], write("bad.yaml", "grid: [a\n"), "line 2"),
    "config-python-tag": (
        ["sweep", "--config", "tag.yaml", "--out", "o"],
        write("tag.yaml", "grid: !!python/object/apply:os.system ['touch pwned']\n"),
        "tag",
    ),
    "config-rounds-0": (
        ["sweep", "-m", "full", "-r", "4", "--config", "r.yaml", "--out", "o"],
        write("r.yaml", "grid: {}\nsettings: {rounds: 0}\n"),
        "setting rounds must be above 0",
    ),
    "sweep-threads-0": (["sweep", "-m", "full", "-r", "4", "--threads", "0", "--out", "o"], None, "--threads"),
    "train-threads-0": ([*TRAIN, "--threads", "0", "--out", "t"], None, "--threads"),
    "report-out-directory": (["report", "run", "--out", "html"], lambda t: (run_dir(t), (t / "html").mkdir()), "--out"),
    "flops-model-nosuch": (["flops", "--model", "nosuch.module:fn"], None, "cannot import nosuch.module"),
    "resume-truncated": ([*TRAIN, "--resume", "--epochs", "2", "--out", "t"], trained(truncated), "cannot be loaded"),
    "resume-empty": (
        [*TRAIN, "--resume", "--epochs", "2", "--out", "t"],
        trained(lambda p: p.write_bytes(b"")),
        "empty",
    ),
    "resume-malicious": (
        [*TRAIN, "--resume", "--epochs", "2", "--out", "t"],
        trained(lambda p: torch.save({"epoch": 1, "x": Payload()}, p)),
        "cannot be loaded",
    ),
    "markup-sweep-mechanism": (["sweep", "-m", "a[/]b", "--out", "o"], None, "unknown mechanism 'a[/]b'"),
    "markup-sweep-out": (["sweep", "-m", "full", "-r", "", "--out", "x[/]y"], None, "--resolution"),
    "markup-report-path": (["report", "no[/]such"], None, "no[/]such"),
    "markup-compare-path": (["compare", "[red]a", "[/]b"], None, "[red]a"),
    "markup-flops-mechanism": (["flops", "-m", "[bold]x[/]"], None, "unknown mechanism '[bold]x[/]'"),
    "markup-train-model": ([*TRAIN, "-m", "[/]m", "--out", "t"], None, "unknown model '[/]m'"),
    "sweep-timeout-negative": (["sweep", "-m", "full", "-r", "4", "--timeout", "-5", "--out", "o"], None, "--timeout"),
    "sweep-resolution-empty": (["sweep", "-m", "full", "-r", "", "--out", "o"], None, "--resolution"),
    "sweep-impl-turbo": (["sweep", "-m", "full", "-r", "4", "--impl", "turbo", "--out", "o"], None, "turbo"),
    "sweep-device-cuda": (["sweep", "-m", "full", "-r", "4", "--device", "cuda", "--out", "o"], None, "CUDA"),
    "report-baseline-nosuch": (["report", "run", "--baseline", "nosuch", "--format", "md"], run_dir, "nosuch"),
    "train-size-0": ([*TRAIN[:-4], "--train-size", "0", "--out", "t"], None, "--train-size"),
    # train, reproduce and match: their options and run directories
    "train-out-file": ([*TRAIN, "--out", "f"], write("f", "not a directory"), "is a file"),
    "train-seed-negative": ([*TRAIN, "--seed", "-1", "--out", "t"], None, "--seed must be 0 or more"),
    "train-lr-inf": ([*TRAIN, "--lr", "inf", "--out", "t"], None, "--lr must be a positive finite number"),
    "train-lr-nan": ([*TRAIN, "--lr", "nan", "--out", "t"], None, "--lr must be a positive finite number"),
    "train-resolution-0": ([*TRAIN, "-r", "0", "--out", "t"], None, "--resolution must be at least 1"),
    "train-into-sweep": (
        [*TRAIN, "--out", "run"],
        lambda t: (run_dir(t), write("run/sweep.json", "{}")(t)),
        "sweep run",
    ),
    "train-other-options": ([*TRAIN, "--seed", "1", "--out", "t"], trained(lambda p: None), "other options (seed"),
    "reproduce-work-file": (
        ["reproduce", "quadtree_mechanisms", "--smoke", "--work", "w", "--out", "o"],
        write("w", "x"),
        "--work w is a file",
    ),
    "reproduce-seeds-negative": (
        ["reproduce", "quadtree_mechanisms", "--seeds", "-1", "--out", "o"],
        None,
        "--seeds must be at least 1",
    ),
    "reproduce-compare-missing": (
        ["reproduce", "quadtree_mechanisms", "--smoke", "--compare", "nonexistent", "--out", "o"],
        None,
        "--compare nonexistent: no results.jsonl",
    ),
    "reproduce-into-sweep": (
        ["reproduce", "quadtree_mechanisms", "--smoke", "--out", "run"],
        lambda t: (run_dir(t), write("run/sweep.json", "{}")(t)),
        "holds a sweep run",
    ),
    "match-resolution-huge": (["match", "--smoke", "-r", "100000", "--out", "o"], None, "from 32 to 1024 px"),
    "match-threads-0": (["match", "--smoke", "--threads", "0", "--out", "o"], None, "--threads must be at least 1"),
    "match-into-sweep": (
        ["match", "--smoke", "--out", "run"],
        lambda t: (run_dir(t), write("run/sweep.json", "{}")(t)),
        "holds a sweep run",
    ),
    "match-other-settings": (
        ["match", "--smoke", "-m", "full", "--seeds", "1", "-r", "64", "--out", "m"],
        lambda t: (
            (t / "m").mkdir(),
            write("m/match.json", '{"preset": "smoke", "resolution": 32, "settings": {}}')(t),
        ),
        "other settings (",
    ),
    "match-of-an-earlier-version": (
        ["match", "--smoke", "-m", "full", "--seeds", "1", "--out", "m"],
        lambda t: ((t / "m").mkdir(), write("m/match.json", '{"preset": "smoke"}')(t)),
        "did not record its preset's settings",
    ),
    # the environment's failures: the path and the OS error, and the data stored before intact
    "disk-full-sweep": (
        ["sweep", "-m", "full", "-r", "4", "--dim", "8", "--device", "cpu", "--out", "run"],
        disk_full(swept),
        "[Errno 28] No space left on device",
    ),
    "disk-full-sweep-new": (
        ["sweep", "-m", "full", "-r", "4", "--dim", "8", "--device", "cpu", "--out", "new/run"],
        disk_full(None),
        "cannot write new/run/env.json: [Errno 28]",
    ),
    "disk-full-train": ([*TRAIN, "--epochs", "1", "--out", "t"], disk_full(None), "[Errno 28]"),
    "disk-full-match": (["match", "--smoke", "-m", "full", "--out", "m"], disk_full(None), "[Errno 28]"),
    "disk-full-reproduce": (["reproduce", "dat_placement", "--smoke", "--out", "o"], disk_full(None), "[Errno 28]"),
    "disk-full-footprint": (["footprint", "-m", "full", "-r", "4", "--out", "f.html"], disk_full(None), "[Errno 28]"),
    "disk-full-compare": (["compare", "run", "run", "--html", "c.html"], disk_full(run_dir), "[Errno 28]"),
    "disk-full-report": (["report", "run", "--out", "r.html"], disk_full(run_dir), "cannot write r.html: [Errno 28]"),
    "read-only-sweep": (
        ["sweep", "-m", "full", "-r", "4", "--dim", "8", "--device", "cpu", "--out", "run"],
        read_only(swept, "run"),
        "[Errno 13] Permission denied",
    ),
    "read-only-report": (["report", "run", "--out", "ro/r.html"], read_only(run_dir, "ro"), "[Errno 13]"),
    "read-only-compare": (["compare", "run", "run", "--html", "ro/c.html"], read_only(run_dir, "ro"), "[Errno 13]"),
    "read-only-footprint": (
        ["footprint", "-m", "full", "-r", "4", "--out", "ro/f.html"],
        read_only(None, "ro"),
        "[Errno 13]",
    ),
    "read-only-train": ([*TRAIN, "--epochs", "1", "--out", "ro/t"], read_only(None, "ro"), "[Errno 13]"),
    "read-only-reproduce": (
        ["reproduce", "dat_placement", "--smoke", "--out", "ro/o"],
        read_only(None, "ro"),
        "[Errno 13]",
    ),
    "read-only-match": (["match", "--smoke", "-m", "full", "--out", "ro/m"], read_only(None, "ro"), "[Errno 13]"),
    # ATTNBENCH_PLUGINS: each failure of a plugin module, in one line that names it
    "plugin-missing": (["sweep", "-m", "full", "-r", "4", "--out", "o"], plugin(None), "cannot be found"),
    "plugin-raises": (
        ["sweep", "-m", "full", "-r", "4", "--out", "o"],
        plugin("raise RuntimeError('no')\n"),
        "RuntimeError",
    ),
    "plugin-syntax-error": (["sweep", "-m", "full", "-r", "4", "--out", "o"], plugin("def (:\n"), "syntax error"),
    "plugin-sys-exit": (
        ["sweep", "-m", "full", "-r", "4", "--out", "o"],
        plugin("import sys\nsys.exit(3)\n"),
        "sys.exit(3)",
    ),
    # inputs too large to be held
    "data-decompression-bomb": (
        [*TRAIN[:-4], "--data", "imgs", "--out", "t"],
        bomb_folder,
        "huge.png is over PIL's limit",
    ),
    "match-decompression-bomb": (
        ["match", "--smoke", "-m", "full", "--data", "imgs/a", "--out", "m"],
        bomb_folder,
        "huge.png",
    ),
    "flops-resolution-huge": (["flops", "-m", "full", "-r", "1000000"], None, "above flops' bound of 65,536 tokens"),
    # stored files that do not read as what they must be
    "stored-huge-integer": (
        ["report", "run", "--out", "r.html"],
        stored("peak_bytes", 10**400),
        "peak_bytes must be int",
    ),
    "stored-env-not-object": (
        ["report", "run", "--out", "r.html"],
        stored("status", "ok", env=[1, 2]),
        "not an object",
    ),
    "compare-html-directory": (
        ["compare", "run", "run", "--html", "d"],
        lambda t: (run_dir(t), (t / "d").mkdir()),
        "--html d is a directory",
    ),
    # experiment files: read with limits, numbers checked where they are read
    "experiment-binary": (reproduce(), experiment(b"\x89PNG\r\n\x1a\n\x00\xff" * 64), "not a text file"),
    "experiment-deep": (
        reproduce(),
        experiment(lambda t: t + "notes: " + "[" * 200 + "]" * 200 + "\n"),
        "nested deeper than 32",
    ),
    "experiment-alias-bomb": (
        reproduce(),
        experiment(lambda t: t + 'notes:\n  a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n' + ALIAS_BOMB),
        "alias bomb",
    ),
    "experiment-too-big": (
        reproduce(),
        experiment(lambda t: t + "#" * 300_000 + "\n"),
        "more than an experiment file may hold",
    ),
    "experiment-lr-inf": (
        reproduce(),
        experiment(lambda t: t.replace("lr: ", "lr: .inf #", 1)),
        "modes.quick.lr: must be a finite number",
    ),
    "experiment-tiny-yes": (
        reproduce(),
        experiment(lambda t: t.replace("tiny: true", 'tiny: "yes"', 1)),
        "modes.quick.tiny: must be true or false",
    ),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file under ``root``, a file by the hash of its bytes."""
    import hashlib

    return {
        str(p.relative_to(root)): "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    args, setup, says = CASES[case]
    if case == "sweep-device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    patches = setup is not None and len(inspect.signature(setup).parameters) == 2
    if patches:
        setup(tmp_path, monkeypatch)  # it patches the process (a full disk, a read-only folder, a plugin)
    elif setup is not None:
        setup(tmp_path)
    before = snapshot(tmp_path)
    res = CliRunner().invoke(cli.app, args)
    out = res.output.strip()
    assert res.exit_code == 2, out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error: ") and says in out, out
    assert "Traceback" not in out and isinstance(res.exception, SystemExit)
    if patches:
        monkeypatch.undo()  # e.g. builtins.open back, to read every file as it is
    assert snapshot(tmp_path) == before


def test_user_strings_are_printed_as_they_are_not_as_rich_markup(tmp_path, monkeypatch):
    import shutil

    from attnbench.bench import executors

    class Instant(executors.InProcess):
        def run(self, points, settings):
            for p in points:
                rec = {**p.to_json(), "status": "ok", "reason": None, "device_name": "cpu", "noisy": False}
                yield rec | {"latency_ms_median": 1.0, "latency_ms_p20": 0.9, "latency_ms_p80": 1.1, "peak_bytes": 100}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(executors, "InProcess", Instant)
    runner = CliRunner()
    res = runner.invoke(
        cli.app, ["sweep", "-m", "full", "-r", "4", "--dim", "8", "--device", "cpu", "--out", "[red]r[/]"]
    )
    assert res.exit_code == 0, res.output
    assert "already in [red]r[/]" in res.output and "results in [red]r[/]/results.jsonl" in res.output
    shutil.copytree(tmp_path / "[red]r[/]", tmp_path / "[bold]new")
    res = runner.invoke(cli.app, ["compare", "[red]r[/]", "[bold]new"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "1 matched points" in res.output


def test_flops_reads_maps_and_knobs_in_the_sweep_grammar():
    from attnbench.bench.points import parse_knob, parse_resolution

    runner = CliRunner()
    args = ["flops", "-m", "quadtree", "-r", "64px:s1", "--dim", "16", "--heads", "2", "-k", "topk=[4,2]", "--json"]
    res = runner.invoke(cli.app, [*args, "-k", "levels=2"])
    assert res.exit_code == 0, res.output
    assert "at 16x16 tokens" in json.loads(res.output)["what"] and parse_resolution("64px:s1")[0].hw == (16, 16)
    assert parse_knob("topk=[4,2]") == ("topk", [["4", "2"]])
    res = runner.invoke(cli.app, ["flops", "-m", "full", "-r", "224px"])  # four stages: not one map
    assert res.exit_code == 2 and "one map" in res.output
