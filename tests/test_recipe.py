"""A bad recipe costs one sentence that names the field; never a stack trace."""

import subprocess
import sys

import pytest
import yaml

from reelforge.jobs.recipe import RecipeError, load_recipe, parse_recipe, parse_size


@pytest.fixture()
def base(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text('{"text": "hi"}\n')
    return tmp_path


def good(**over):
    raw = {"name": "r", "sources": [{"name": "t", "format": "text", "path": "data/t.jsonl"}],
           "steps": [{"probe": {}}, {"quality": {"min_side": 8}}], "output": {"path": "out"}}
    raw.update(over)
    return raw


def test_good_recipe_parses_with_defaults(base):
    r = parse_recipe(good(), str(base))
    assert r.sources[0].paths == [str(base / "data" / "t.jsonl")]
    assert r.shards == {"max_samples": 1000, "max_bytes": 1 << 30, "shuffle": True, "prefix": "shard"}
    assert r.output == str(base / "out")
    assert [s.name for s in r.steps] == ["probe", "quality"]


@pytest.mark.parametrize("raw,field", [
    (good(sources=[{"name": "t", "format": "csv", "path": "data/t.jsonl"}]), "sources[0].format"),
    (good(sources=[{"name": "t", "format": "text", "path": "nope/*.jsonl"}]), "sources[0].path"),
    (good(sources=[{"name": "t", "format": "text", "path": "data/t.jsonl", "colour": 1}]), "sources[0].colour"),
    (good(steps=[{"quality": {"min_side": "big"}}]), "steps[0].quality.min_side"),
    (good(steps=[{"quality": {"min_sid": 3}}]), "steps[0].quality.min_sid"),
    (good(steps=[{"blur": {}}]), "steps[0]"),
    (good(output={"path": "o", "shards": {"max_bytes": "lots"}}), "output.shards.max_bytes"),
    (good(output={"path": "o", "shards": {"max_samples": 0}}), "output.shards.max_samples"),
    (good(seed="x"), "seed"),
    (good(sources=[]), "sources"),
    (good(roots=5), "roots"),
    (good(roots=["data", "no-such-folder"]), "roots[1]"),
    (good(sources=[{"name": "t", "format": "text", "path": "data/t.jsonl", "options": {"roots": [""]}}]),
     "sources[0].options.roots[0]"),
    (good(sources=[{"name": "t", "format": "text", "path": "data/t.jsonl", "options": {"media_root": 3}}]),
     "sources[0].options.media_root"),
])
def test_bad_fields_are_named(base, raw, field):
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, str(base))
    assert f"`{field}" in str(e.value)
    assert "\n" not in str(e.value)


def test_sizes():
    assert parse_size("8MB", "x") == 8_000_000
    assert parse_size("1GiB", "x") == 1 << 30
    assert parse_size(4096, "x") == 4096
    with pytest.raises(RecipeError):
        parse_size("-3MB", "x")


def test_yaml_error_names_the_line(base):
    p = base / "r.yaml"
    p.write_text("name: r\nsources: [\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(str(p))


def test_cli_prints_one_sentence_and_exits_2(base):
    p = base / "r.yaml"
    raw = good()
    raw["sources"][0]["path"] = "missing/*.jsonl"
    p.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "run", str(p)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("reelforge: recipe field `sources[0].path` matches no files")
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "run", str(base / "absent.yaml")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_unwritable_output_is_one_sentence(base):
    p = base / "r.yaml"
    p.write_text(yaml.safe_dump(good()))
    blocker = base / "file"
    blocker.write_text("x")  # a file where the output folder's parent should be
    res = subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "run", str(p), "--out", str(blocker / "out")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "cannot be written" in res.stderr and "--out" in res.stderr and "Traceback" not in res.stderr


def test_roots_merge_into_each_source(base):
    (base / "media").mkdir()
    raw = good(roots=["media"])
    raw["sources"][0]["options"] = {"roots": ["data"]}
    r = parse_recipe(raw, str(base))
    assert r.sources[0].options["roots"] == [str(base / "media"), str(base / "data")]
    assert "roots" not in parse_recipe(good(), str(base)).sources[0].options


def test_output_apart_from_the_sources(base):
    for out, what in [(str(base / "data"), "holds"), (str(base), "holds"), (str(base / "data" / "sub"), "inside")]:
        raw = good(sources=[{"name": "t", "format": "text", "path": "data/"}])
        with pytest.raises(RecipeError, match=what) as e:
            parse_recipe(raw, str(base), out=out)
        assert "--out" in str(e.value) and "\n" not in str(e.value)
    parse_recipe(good(), str(base), out=str(base / "data" / "sub"))  # a single file's folder is not searched


def test_content_digests_see_a_same_size_same_mtime_edit(tmp_path):
    import os

    from reelforge.jobs.recipe import content_digests

    f, cache = tmp_path / "a.jsonl", str(tmp_path / "digests.json")
    f.write_text('{"text": "aaaa"}\n')
    st = f.stat()
    first = content_digests([str(f)], cache)
    hashed: list = []
    assert content_digests([str(f)], cache, hash_many=lambda ps: hashed.extend(ps) or {}) == first
    assert hashed == []  # unchanged: from the cache
    f.write_text('{"text": "bbbb"}\n')
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_digests([str(f)], cache) != first
    (tmp_path / "digests.json").write_text("")  # a corrupt cache is rebuilt
    assert content_digests([str(f)], cache) != first
