"""indexer.engine: the same task results from the local engine and a real local Ray cluster, and a
worker killed mid-task costs only its own item; ``map_actors`` reads its shared state once per
actor, and an actor killed mid-item costs only that item."""

import os
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest

from clip_density_index.indexer import parallel
from clip_density_index.indexer.engine import LocalEngine, engine_for, open_engine
from clip_density_index.indexer.errors import BadInput, InvalidParameter

ray = pytest.importorskip("ray")


def _row_sums(item, shared):
    lo, hi = item
    return shared[lo:hi].sum(axis=1)


def _dies_once(item, shared):
    """Kills its own worker process the first time it sees item 2 (a marker file remembers)."""
    marker = Path(shared) / f"died-{item}"
    if item == 2 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    (Path(shared) / f"ran-{item}-{os.getpid()}").write_text("")
    return item * item


class Marked:
    """Shared state that leaves a file in ``folder`` each time it is unpickled: a model loaded."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __setstate__(self, state):
        self.__dict__.update(state)
        (Path(self.folder) / f"loaded-{os.getpid()}-{uuid.uuid4().hex}").write_text("")


def _square(item, shared: Marked):
    """Kills its own process the first time it sees item -1 (a marker file remembers); raises a
    domain error for item -2; else leaves a file naming the item and its process."""
    folder = Path(shared.folder)
    if item == -2:
        raise BadInput("item -2 is not a number one can square here")
    if item == -1 and not (folder / "died").exists():
        (folder / "died").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    (folder / f"ran-{item}-{os.getpid()}").write_text("")
    return item * item


def test_ray_and_local_give_the_same_results(ray_engine):
    x = np.random.default_rng(0).standard_normal((1000, 8))
    items = [(lo, min(lo + 128, 1000)) for lo in range(0, 1000, 128)]
    local = dict(LocalEngine().map(_row_sums, items, x))
    remote = dict(ray_engine.map(_row_sums, items, ray_engine.put(x)))
    assert set(remote) == set(items)
    for it in items:
        np.testing.assert_array_equal(remote[it], local[it])


def test_a_killed_worker_costs_only_its_item(ray_engine, tmp_path):
    got = list(ray_engine.map(_dies_once, range(6), str(tmp_path)))
    assert sorted(got) == [(i, i * i) for i in range(6)]  # every item once, item 2 included
    assert (tmp_path / "died-2").exists()
    assert len(list(tmp_path.glob("ran-2-*"))) == 1  # the retry ran it once more, not twice


def test_actors_read_the_shared_state_once_each(ray_engine, tmp_path):
    items = list(range(10))
    (tmp_path / "local").mkdir()
    local = list(LocalEngine().map_actors(_square, items, Marked(tmp_path / "local")))
    assert local == [(i, i * i) for i in items]
    got = list(ray_engine.map_actors(_square, items, ray_engine.put(Marked(tmp_path))))
    assert sorted(got) == local
    loads = {p.name.split("-")[1] for p in tmp_path.glob("loaded-*")}
    ran = {p.name.split("-")[2] for p in tmp_path.glob("ran-*")}
    assert len(list(tmp_path.glob("loaded-*"))) == len(loads) <= 2  # one load per actor (2 CPUs: 2 actors)
    assert ran == loads and len(list(tmp_path.glob("ran-*"))) == len(items)  # 10 items, each once


def test_a_killed_actor_costs_only_its_item(ray_engine, tmp_path):
    items = [3, -1, 4, 5, 6]
    got = list(ray_engine.map_actors(_square, items, Marked(tmp_path)))
    assert sorted(got) == sorted((i, i * i) for i in items)  # every item once, the killed one included
    died = (tmp_path / "died").read_text()
    assert not (tmp_path / f"ran--1-{died}").exists()
    for i in items:  # each item ran to its end once: the killed one again, in the restarted actor
        assert len(list(tmp_path.glob(f"ran-{i}-*"))) == 1, i
    assert len(list(tmp_path.glob("loaded-*"))) <= 3  # two actors, one of them restarted: loaded again


def test_a_domain_error_on_an_actor_is_raised_as_itself(ray_engine, tmp_path):
    with pytest.raises(BadInput, match="^item -2 is not a number one can square here$"):
        list(parallel.run_tasks(ray_engine, _square, [1, -2, 3], Marked(tmp_path), actors=True))


def test_bad_engine_options_are_one_line():
    with pytest.raises(InvalidParameter, match="^Unknown engine 'spark': expected one of local, ray$"):
        open_engine("spark")
    with pytest.raises(InvalidParameter, match="^address needs engine ray$"):
        open_engine("local", address="auto")


def test_the_cli_names_the_engine_options_by_their_flags(tmp_path):
    from click.testing import CliRunner

    from clip_density_index import cli

    r = CliRunner().invoke(cli.cli, ["build-index", "--n", "100", "--out", str(tmp_path / "i"), "--address", "auto"])
    assert r.exit_code != 0 and "--address needs --engine ray" in r.output


def test_engine_for_closes_the_engine_it_opened_and_only_that(monkeypatch):
    from clip_density_index.indexer import engine as engine_module

    closed = []

    class Spy(LocalEngine):
        def close(self):
            closed.append(self)

    own = Spy()
    with engine_for(own) as eng:
        assert eng is own
    assert closed == []  # an engine given open is its opener's to close
    monkeypatch.setattr(engine_module, "open_engine", lambda name, address=None: Spy())
    with engine_for("local") as eng:
        assert isinstance(eng, Spy) and eng is not own and closed == []
    assert closed == [eng]
    with pytest.raises(RuntimeError), engine_for("local") as failing:
        raise RuntimeError("the call failed")
    assert closed[-1] is failing and failing is not eng
    with pytest.raises(InvalidParameter, match="address applies to an engine given by name"):
        with engine_for(own, address="auto"):
            pass
