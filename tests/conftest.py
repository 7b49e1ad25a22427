"""Shared fixtures: one local[2] Spark session and one small demo corpus per test run."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("REELFORGE_SPARK_UI", "0")  # Spark's UI: a port and ~0.2-1 s per session; on for users
sys.path.insert(0, os.path.dirname(__file__))
import s3_server  # noqa: E402 - its endpoint and test credentials go into the environment before any JVM starts

s3_server.set_environment()


@pytest.fixture(scope="session")
def s3():
    """A local S3 server (moto) for the object-storage tests: `s3.bucket(name)` -> "s3://name"."""
    server = s3_server.S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spark():
    from reelforge.jobs.spark import get_spark

    s = get_spark("local[2]")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> str:
    """A small real corpus (images, H.264 videos, text, conversations, planted breakage)."""
    from reelforge.curation.demo_corpus import make_demo_corpus

    root = tmp_path_factory.mktemp("corpus")
    return make_demo_corpus(str(root), n_images=48, n_videos=6, seed=0, log=lambda *a: None)


@pytest.fixture(scope="session")
def demo_run(spark, demo_corpus, tmp_path_factory) -> dict:
    """The demo recipe run once under local[2]; tests read its outputs."""
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out = str(tmp_path_factory.mktemp("run-local"))
    report = run_recipe(load_recipe(demo_corpus, out=out), spark=spark, log=lambda *a: None)
    return {"out": out, "report": report, "recipe": demo_corpus}


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """One `local-cluster[2,1,1024]` Spark for every parity test (`cluster`):
    `local_cluster.run(recipe, out)` runs a recipe on it and returns the report."""
    from local_cluster import LocalCluster

    lc = LocalCluster(str(tmp_path_factory.mktemp("local-cluster") / "spark.log"))
    yield lc
    lc.close()


@pytest.fixture(scope="session", autouse=True)
def _local_cluster_starts_early(request):
    """When a selected test uses `local_cluster`, its process starts with the session: its JVMs
    start beside the other tests (the parity tests run last, back to back)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist, the worker given the `cluster` group starts it on use
        return
    if any("local_cluster" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("local_cluster").start()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, demo_corpus) -> dict:
    """Tiny SigLIP + Qwen3 checkpoints saved to disk, for the training tests."""
    from train_common import tiny_models

    return tiny_models(str(tmp_path_factory.mktemp("tiny")), demo_corpus)


@pytest.fixture(scope="session")
def shards(demo_corpus, tmp_path_factory) -> str:
    """The demo corpus's samples written by the shard writer directly (no Spark run to wait
    for), which the training tests read."""
    from local_shards import write_shards_locally

    return write_shards_locally(demo_corpus, str(tmp_path_factory.mktemp("shards")))


# Test tiers: `make test-fast` runs what carries none of these markers. A test that starts Spark
# (directly or through a fixture) is `spark`, one that uses the `local_cluster` fixture `cluster` too;
# the DeepSpeed stage runs are `train`; `slow` is set in the test files themselves.
TRAIN_MODULES = ("test_train_stages",)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers (make test-fast)
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if {"spark", "demo_run", "local_cluster"} & fixtures:
            item.add_marker(pytest.mark.spark)
        if "local_cluster" in fixtures:
            item.add_marker(pytest.mark.cluster)
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in TRAIN_MODULES:
            item.add_marker(pytest.mark.train)


class _GroupAndOrder:
    """Runs after xdist's own hook (see _share_a_worker) and after `-m` has deselected."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        _order(config, items)


def pytest_configure(config):
    config.pluginmanager.register(_GroupAndOrder(), "reelforge-group-and-order")


def _order(config, items) -> None:
    _share_a_worker(config, items)
    # each file kept whole (moving only its parity tests would tear its module fixtures down and
    # build them again). In one process, the files with parity tests run last: by then the local
    # cluster that started with the session is warm. Under `--dist loadgroup` they run first: their
    # group is the longest unit of work, and a worker that took it last would run it alone at the end
    cluster_files = {item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("cluster")}
    first = bool(getattr(config.option, "loadgroup", False))
    items.sort(key=lambda item: (item.nodeid.split("::", 1)[0] in cluster_files) != first)


def _shared_fixtures(item) -> bool:
    """Whether the test uses a module- or class-scoped fixture (a Spark run, a corpus built once per file)."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(defs.get(name) and defs[name][-1].scope in ("module", "class", "package")
               for name in getattr(item, "fixturenames", ()))


def _share_a_worker(config, items) -> None:
    """`--dist loadgroup` (make test): the tests that share something costly run on one worker. The
    local-cluster tests share one cluster (group `cluster`); in each file, the tests that share a module-
    scoped fixture share one build of it (group = the file; `cluster` when one of them is a parity test).
    xdist reads the group from a `@group` suffix of the node id, which it writes into `item._nodeid`; since
    pytest 9.2 the id lives in `item._id` and that write is lost (pytest-xdist#1386: every test was spread
    alone, so the demo-full run, every module-scoped run and the local cluster were built on both
    workers). The suffix is written here, once, where xdist's did not take."""
    if not getattr(config.option, "loadgroup", False):  # set on the xdist workers of `--dist loadgroup`
        return
    cluster_files = {item.module.__name__ for item in items
                     if item.get_closest_marker("cluster") and item.module is not None and _shared_fixtures(item)}
    for item in items:
        if item.get_closest_marker("cluster"):
            group = "cluster"
        elif item.module is not None and _shared_fixtures(item):
            group = "cluster" if item.module.__name__ in cluster_files else item.module.__name__.rsplit(".", 1)[-1]
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
        if "@" in item.nodeid.rsplit("]", 1)[-1]:  # a fixed xdist (or an older pytest) already wrote one
            continue
        if hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(f"{item.nodeid}@{group}")
        else:
            item._nodeid = f"{item.nodeid}@{group}"
