"""`reelforge run` with sources on s3:// and `--out s3://...`, against a local S3 server (moto).

The demo corpus is uploaded to a bucket; the demo recipe, its sources pointed at the bucket, runs
with its output on another bucket: the counts equal a local run of the same corpus, every published
object has the bytes of the file the run wrote in its staging folder, no temporary object is left,
the ledger names the objects' URLs, and a re-run uploads nothing. A missing bucket and a prefix
holding foreign objects are one sentence from the CLI (exit 2). local-cluster[2,1,1024] publishes
the same shard bytes to s3 as the local[2] run wrote to its local folder."""

from __future__ import annotations

import json
import os

import pyarrow.dataset as ds
import pytest
import yaml

from reelforge.curation import storage

pytestmark = [pytest.mark.spark, pytest.mark.slow]

CORPUS_BUCKET = "reelforge-s3run-corpus"
OUT_BUCKET = "reelforge-s3run-out"
ESCAPE = "corpus/tars/../../../escape.jsonl"  # a key that names a place outside any folder it is mirrored to


def _quiet(*a):
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3, spark):
    """The corpus on disk and in a bucket, a recipe for each, and the local run of the local recipe."""
    from reelforge.curation.demo_corpus import make_demo_corpus
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    root = tmp_path_factory.mktemp("s3run")
    staging = str(root / "staging")
    old = os.environ.get("REELFORGE_STAGING")
    os.environ["REELFORGE_STAGING"] = staging  # the sources' mirror goes here, not under ~/.cache
    local_recipe = make_demo_corpus(str(root / "corpus"), n_images=16, n_videos=2, seed=0, log=_quiet)
    corpus = os.path.dirname(local_recipe)
    bucket = s3.bucket(CORPUS_BUCKET)
    s3.bucket(OUT_BUCKET)
    fs, _ = storage.url_fs(bucket)
    for rel, _size in storage.walk_files(corpus):
        if rel != "recipe.yaml" and not rel.startswith("tokenizer"):
            fs.put_file(os.path.join(corpus, rel), f"{CORPUS_BUCKET}/corpus/{rel}")
    fs.pipe_file(f"{CORPUS_BUCKET}/{ESCAPE}", b'{"text": "must never be written outside the mirror"}\n')
    raw = yaml.safe_load(open(local_recipe))
    for s in raw["sources"]:
        s["path"] = f"{bucket}/corpus/{s['path']}"
    raw["sources"][1]["path"] = f"{bucket}/corpus/capt*.jsonl"  # a glob
    raw["steps"][1]["tokens"]["tokenizer"] = os.path.join(corpus, "tokenizer")
    s3_recipe = str(root / "s3-recipe.yaml")
    with open(s3_recipe, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    local = run_recipe(load_recipe(local_recipe, out=str(root / "local-run")), spark=spark, log=_quiet)
    yield {"root": root, "local_recipe": local_recipe, "s3_recipe": s3_recipe, "local": local,
           "staging": staging, "corpus": corpus}
    if old is None:
        os.environ.pop("REELFORGE_STAGING", None)
    else:
        os.environ["REELFORGE_STAGING"] = old


@pytest.fixture(scope="module")
def remote_run(env, spark):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.remote import run

    url = f"s3://{OUT_BUCKET}/runs/demo"
    work = str(env["root"] / "work")
    lines: list[str] = []
    first = run(load_recipe(env["s3_recipe"], out=url), spark=spark, log=lines.append, work=work)
    second = run(load_recipe(env["s3_recipe"], out=url), spark=spark, log=lines.append, work=work)
    return {"url": url, "work": work, "first": first, "second": second, "log": lines}


def _counts(report: dict) -> dict:
    return {"inputs": report["inputs"], "derived": report["derived"], "kept": report["kept"],
            "dropped": report["dropped"], "shards": report["shards"], "balanced": report["balanced"],
            "steps": [(s["step"], s["in"], s["out"], s["dropped"]) for s in report["steps"]]}


def _fates(ledger: str) -> set:
    t = ds.dataset(ledger, format="parquet").to_table(columns=["id", "fate", "step", "reason"]).to_pylist()
    return {(r["id"], r["fate"], r["step"], r["reason"]) for r in t}


def test_s3_sources_and_output_match_a_local_run(env, remote_run):
    first, url, work = remote_run["first"], remote_run["url"], remote_run["work"]
    local = env["local"]
    # the same decisions as the local run of the same corpus: counts, per step, and every sample's fate
    assert _counts(first) == _counts(local), (_counts(first), _counts(local))
    assert first["inputs"] > 20 and first["kept"] > 10 and first["shards"] >= 1
    assert _fates(os.path.join(work, "ledger")) == _fates(os.path.join(os.path.dirname(local["paths"]["ledger"]),
                                                                          "ledger"))
    # the mirror: every object under the corpus prefix fetched once; the `..` key refused and counted
    mirror = first["mirror"]
    n_objects = sum(1 for _ in storage.walk_files(f"s3://{CORPUS_BUCKET}/corpus"))
    assert mirror["downloaded"] == mirror["objects"] == n_objects - 1 and mirror["failed"] == []
    assert mirror["unsafe_keys"] == [f"s3://{CORPUS_BUCKET}/{ESCAPE}"]
    assert not any("escape" in f for _d, _s, fs in os.walk(env["root"]) for f in fs)
    # published: every file the run wrote (but _work/) is an object with the same bytes; reports name the URL
    published = dict(storage.walk_files(url))
    assert not [k for k in published if storage.TMP_MARK in k]
    mine = {}
    for d, _dirs, files in os.walk(work):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), work)
            if not rel.startswith(("_work", "_reelforge.lock")) and not (f.startswith(".") and f.endswith(".crc")):
                mine[rel] = os.path.join(d, f)
    assert set(published) == set(mine) | {"_reelforge_published.json"}, set(published) ^ set(mine)
    tars = [r for r in mine if r.startswith("shards/") and r.endswith(".tar")]
    assert len(tars) == first["shards"]
    differ = [r for r in mine if not r.startswith("report.")
              and storage.read_bytes(storage.join(url, r)) != open(mine[r], "rb").read()]
    assert differ == []
    assert first["publish"]["uploaded"] == len(mine) - 1  # all but the run marker, written when the URL was claimed
    report_json = storage.read_bytes(storage.join(url, "report.json")).decode()
    assert work not in report_json and f"{url}/shards" in report_json
    assert first["paths"]["shards"] == f"{url}/shards" and first["paths"]["index"] == f"{url}/shards/index.json"
    # the ledger says where each record came from: the object's URL, not the mirror
    locs = ds.dataset(storage.join(url, "ledger").replace("s3://", ""), format="parquet",
                      filesystem=storage.url_fs(url)[0]).to_table(columns=["source_location"]).column(0).to_pylist()
    assert locs and all(v.startswith(f"s3://{CORPUS_BUCKET}/corpus/") for v in locs), sorted(set(locs))[:5]
    assert not any(env["staging"] in v for v in locs)
    # the credentials came from the environment and are nowhere in what the run published or logged
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    leaked = [k for k in published if any(x in storage.read_bytes(storage.join(url, k)) for x in secrets)]
    assert leaked == [] and not any(x.decode() in line for line in remote_run["log"] for x in secrets)


def test_a_rerun_uploads_and_downloads_nothing(remote_run):
    second = remote_run["second"]
    assert second["mirror"]["downloaded"] == 0 and second["mirror"]["skipped"] == second["mirror"]["objects"]
    pub = second["publish"]
    assert "shards" in second["reused"]  # the local run wrote nothing (jobs.run's no-op re-run) ...
    assert pub["uploaded"] == 0 and pub["deleted"] == 0 and pub["temps_removed"] == 0, pub  # ... nor does publish
    assert _counts(second) == _counts(remote_run["first"])
    assert not [k for k, _ in storage.walk_files(remote_run["url"]) if storage.TMP_MARK in k]
    assert dict(storage.walk_files(remote_run["url"]))  # and the ledger is not doubled by stale part files
    ledger = ds.dataset(f"{OUT_BUCKET}/runs/demo/ledger", format="parquet",
                        filesystem=storage.url_fs(remote_run["url"])[0])
    assert ledger.count_rows() == second["inputs"] + second["derived"]


def test_ledger_reads_a_published_run_and_inspect_points_at_its_staging(remote_run, capsys):
    from reelforge.jobs.cli import main

    url, work = remote_run["url"], remote_run["work"]
    local_lines = ds.dataset(os.path.join(work, "ledger"), format="parquet").to_table().to_pylist()
    dropped = sorted(r["id"] for r in local_lines if r["fate"] == "dropped")
    reason = next(r["reason"] for r in local_lines if r["id"] == dropped[0])
    capsys.readouterr()
    assert main(["ledger", url, "--reason", reason, "--limit", "1000"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in local_lines if r["reason"] == reason)
    assert main(["inspect", url, "--reason", reason]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "staging folder" in err and "Traceback" not in err


def test_missing_bucket_and_foreign_prefix_are_one_sentence(env, remote_run, s3, capsys):
    from reelforge.jobs.cli import main

    recipe = env["s3_recipe"]
    cases = {
        "s3://reelforge-no-such-bucket/run": r"bucket",
        f"s3://{OUT_BUCKET}/foreign": "did not write",
    }
    storage.write_bytes(f"s3://{OUT_BUCKET}/foreign/notes.txt", b"someone else's")
    for out, said in cases.items():
        capsys.readouterr()
        assert main(["run", recipe, "--out", out, "--work", str(env["root"] / "w-err")]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert storage.read_bytes(f"s3://{OUT_BUCKET}/foreign/notes.txt") == b"someone else's"
    # a source on a missing bucket: the recipe is refused, before anything runs
    raw = yaml.safe_load(open(recipe))
    raw["sources"][0]["path"] = "s3://reelforge-no-such-source/corpus/tars/"
    bad = env["root"] / "bad-source.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["run", str(bad), "--out", str(env["root"] / "never")]) == 2
    err = capsys.readouterr().err
    assert "sources[0].path" in err and "Traceback" not in err, err
    # an output under a source's root prefix would re-read itself
    assert main(["run", recipe, "--out", f"s3://{CORPUS_BUCKET}/corpus/out"]) == 2
    assert "overlaps" in capsys.readouterr().err


def test_local_cluster_writes_the_same_shard_bytes_to_s3(env, remote_run, local_cluster):
    url = f"s3://{OUT_BUCKET}/runs/cluster"
    report = local_cluster.run(env["s3_recipe"], url, work=str(env["root"] / "work-cluster"),
                               env={"REELFORGE_STAGING": env["staging"]})
    assert report["master"] == "local-cluster[2,1,1024]" and report["balanced"]
    assert _counts(report) == _counts(remote_run["first"])
    local_shards = os.path.join(remote_run["work"], "shards")  # the local[2] run's local folder
    names = sorted(r for r, _ in storage.walk_files(local_shards) if not r.startswith(".nv-meta"))
    assert sum(n.endswith(".tar") for n in names) == report["shards"] and "index.json" in names
    on_s3 = sorted(r for r, _ in storage.walk_files(f"{url}/shards") if not r.startswith(".nv-meta"))
    assert on_s3 == names
    for n in names:
        assert storage.read_bytes(f"{url}/shards/{n}") == open(os.path.join(local_shards, n), "rb").read(), n
