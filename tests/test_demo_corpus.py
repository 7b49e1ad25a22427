"""The demo corpus: same bytes for a seed, every planted input where planted.json says, real videos.

No Spark here: the readers and the row steps (probe, quality) are called directly, and exact
dedup is re-done in Python, so a wrong planted.json fails fast and says which entry.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile

import pytest
import yaml
from PIL import Image

from reelforge.curation.demo_corpus import PATTERNS, make_demo_corpus, video_plan
from reelforge.curation.readers import DEFAULT_PATTERNS, READERS

N_IMAGES, N_VIDEOS = 40, len(PATTERNS)  # every video pattern, so each is checked for determinism
BROKEN = {"truncated_jpeg": "corrupt_image", "zero_byte_video": "empty_file", "bad_json_line": "bad_json",
          "missing_path": "missing_file", "not_a_video": "corrupt_video", "tiny_image": "too_small"}
Key = tuple[str, str]


def _quiet(*_a: object) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("demo") / "corpus"
    recipe = make_demo_corpus(str(root), n_images=N_IMAGES, n_videos=N_VIDEOS, seed=0, log=_quiet)
    assert recipe == os.path.join(str(root), "recipe.yaml")
    return str(root)


def _hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _planted(root: str) -> dict:
    with open(os.path.join(root, "planted.json")) as f:
        return json.load(f)


def _broken(root: str) -> dict[str, dict]:
    return {k: v for k, v in _planted(root).items() if isinstance(v, dict) and "reason" in v}


def _read_all(root: str) -> dict[Key, dict]:
    """Every row of every source, read the way the recipe names them (source folder as root)."""
    with open(os.path.join(root, "recipe.yaml")) as f:
        recipe = yaml.safe_load(f)
    rows: dict[Key, dict] = {}
    for src in recipe["sources"]:
        p = os.path.join(root, src["path"])
        if os.path.isdir(p):
            src_root = p
            files = sorted({f for pat in DEFAULT_PATTERNS[src["format"]]
                            for f in glob.glob(os.path.join(p, "**", pat), recursive=True)})
        else:
            src_root, files = os.path.dirname(p), [p]
        assert files, src
        for path in files:
            for row in READERS[src["format"]](path, src["name"], src_root, src.get("options") or {}):
                key = (row["source"], row["source_key"])
                assert key not in rows, f"two rows share the key {key}"
                rows[key] = row
    return rows


@pytest.fixture(scope="module")
def probed(corpus: str) -> dict[Key, dict]:
    """All rows after the recipe's probe and quality steps, run in-process."""
    from reelforge.curation.probe import Probe
    from reelforge.filters.quality import Quality

    with open(os.path.join(corpus, "recipe.yaml")) as f:
        steps = {k: v for s in yaml.safe_load(f)["steps"] for k, v in s.items()}
    rows = _read_all(corpus)
    keys = list(rows)
    out = Probe(**steps["probe"]).process_rows([rows[k] for k in keys])
    out = Quality(**steps["quality"]).process_rows(out)
    return dict(zip(keys, out))


def test_same_seed_writes_the_same_bytes(corpus: str, tmp_path) -> None:
    again = str(tmp_path / "again")
    make_demo_corpus(again, n_images=N_IMAGES, n_videos=N_VIDEOS, seed=0, log=_quiet)
    first, second = _hashes(corpus), _hashes(again)
    assert first == second
    for name in ("recipe.yaml", "planted.json", "captions.jsonl", "text.jsonl", "conversations.jsonl",
                 "interleaved.jsonl", "preferences.parquet", "tars/part-00000.tar", "tars/part-00002.tar",
                 "videos/clip000.mp4"):
        assert name in first, name
    # a rebuild in place replaces the old corpus and gives the same bytes again
    make_demo_corpus(again, n_images=N_IMAGES, n_videos=N_VIDEOS, seed=0, log=_quiet)
    assert _hashes(again) == first


def test_another_seed_draws_other_images(corpus: str, tmp_path) -> None:
    other = str(tmp_path / "seed1")
    make_demo_corpus(other, n_images=N_IMAGES, n_videos=2, seed=1, log=_quiet)
    a, b = _hashes(corpus), _hashes(other)
    assert a["tars/part-00000.tar"] != b["tars/part-00000.tar"]


def test_a_folder_that_is_not_a_demo_corpus_is_left_alone(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="planted.json"):
        make_demo_corpus(str(tmp_path), n_images=N_IMAGES, n_videos=N_VIDEOS, log=_quiet)
    assert (tmp_path / "images" / "mine.jpg").read_bytes() == b"precious"


def test_planted_json_lists_every_broken_kind_and_the_duplicates(corpus: str) -> None:
    broken = _broken(corpus)
    assert {k: v["reason"] for k, v in broken.items()} == BROKEN
    for name, p in broken.items():
        assert p["source"] and p["source_key"] and os.path.exists(os.path.join(corpus, p["file"])), name
    pairs = _planted(corpus)["duplicates"]["pairs"]
    kinds = [p["kind"] for p in pairs]
    assert (kinds.count("image"), kinds.count("video"), kinds.count("text")) == (5, 2, 3)
    for p in pairs:  # image copies sit in another tar than their original
        if p["kind"] == "image":
            assert p["a"].split("/")[0] != p["b"].split("/")[0]


def test_readers_give_each_planted_input_its_recorded_key(corpus: str) -> None:
    rows = _read_all(corpus)
    broken = _broken(corpus)
    for name, p in broken.items():
        row = rows.get((p["source"], p["source_key"]))
        assert row is not None, (name, p["source_key"])
        if p["reason"] == "bad_json":
            assert (row["drop_step"], row["drop_reason"]) == ("ingest", "bad_json"), name
        else:
            assert row["drop_step"] is None, (name, row["drop_reason"])
    # the bad line is the only row the readers drop
    assert [k for k, r in rows.items() if r["drop_step"]] == [("text", broken["bad_json_line"]["source_key"])]
    for p in _planted(corpus)["duplicates"]["pairs"]:
        assert (p["source"], p["a"]) in rows and (p["source"], p["b"]) in rows, p
    kinds = {r["kind"] for r in rows.values() if not r["drop_step"]}
    assert kinds == {"image_text", "video_text", "text", "conversation", "interleaved", "preference"}


def test_probe_and_quality_drop_exactly_the_planted_inputs(corpus: str, probed: dict[Key, dict]) -> None:
    dropped = {k: r["drop_reason"] for k, r in probed.items() if r["drop_step"]}
    expected = {(p["source"], p["source_key"]): p["reason"] for p in _broken(corpus).values()}
    assert dropped == expected
    for p in _broken(corpus).values():
        assert probed[(p["source"], p["source_key"])]["drop_step"] == p["step"], p


def _norm_text(row: dict) -> str:
    """The text ExactDedup compares: everything joined, whitespace collapsed, lower case."""
    msgs = "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"] or [])
    text = "\n".join([row["text"] or "", msgs, row["chosen"] or "", row["rejected"] or ""])
    return re.sub(r"\s+", " ", text).strip().lower()


def test_only_the_planted_pairs_are_exact_duplicates(corpus: str, probed: dict[Key, dict]) -> None:
    groups: dict[str, list[Key]] = {}
    for k, r in probed.items():
        if r["drop_step"]:
            continue
        shas = ",".join(m["sha256"] for m in r["media"] or [])
        key = f"m:{shas}" if r["kind"] in ("image_text", "video_text") and shas else f"t:{shas}|{_norm_text(r)}"
        groups.setdefault(key, []).append(k)
    found = {frozenset(g) for g in groups.values() if len(g) > 1}
    planted = {frozenset({(p["source"], p["a"]), (p["source"], p["b"])})
               for p in _planted(corpus)["duplicates"]["pairs"]}
    assert found == planted


def test_tar_members_are_img2dataset_style(corpus: str) -> None:
    formats, aspects = set(), []
    for tar in sorted(glob.glob(os.path.join(corpus, "tars", "*.tar"))):
        with tarfile.open(tar) as tf:
            members = {m.name: m for m in tf.getmembers()}
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
            for name in members:
                key, ext = name.split(".", 1)
                if ext != "json":
                    continue
                meta = json.loads(tf.extractfile(name).read())
                assert set(meta) == {"url", "caption", "width", "height"}
                assert tf.extractfile(f"{key}.txt").read().decode() == meta["caption"]
                (img_name,) = [n for n in members if n.startswith(key + ".") and n.split(".")[1] in
                               ("jpg", "png", "webp")]
                img = Image.open(io.BytesIO(tf.extractfile(img_name).read()))
                img.load()
                assert img.size == (meta["width"], meta["height"])
                formats.add(img.format)
                aspects.append(max(img.size) / min(img.size))
    assert formats == {"JPEG", "PNG", "WEBP"} and max(aspects) >= 4


def test_videos_decode_with_their_planned_duration(corpus: str) -> None:
    plan = video_plan(N_VIDEOS, 0)
    assert len({s.pattern for s in plan}) == N_VIDEOS
    copies = {f"copy{j:03d}.mp4": s for j, s in enumerate(plan[:2])}
    for name, spec in [(s.name, s) for s in plan] + list(copies.items()):
        path = os.path.join(corpus, "videos", name)
        res = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                              "-show_entries", "stream=codec_name,width,height,nb_read_frames,duration,pix_fmt",
                              "-of", "json", path], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)["streams"][0]
        assert (st["codec_name"], st["pix_fmt"], st["width"], st["height"]) == \
            ("h264", "yuv420p", spec.width, spec.height), name
        assert int(st["nb_read_frames"]) == spec.frames, name
        assert abs(float(st["duration"]) - spec.duration) < 1.0 / spec.fps, name
        assert 1.0 <= spec.duration <= 6.0
        stem = os.path.join(corpus, "videos", name[:-4])
        assert os.path.exists(stem + ".txt") or os.path.exists(stem + ".json"), name


def test_recipe_is_valid_and_names_every_source(corpus: str) -> None:
    from reelforge.jobs.recipe import load_recipe

    recipe = load_recipe(os.path.join(corpus, "recipe.yaml"))
    assert [(s.name, s.format) for s in recipe.sources] == [
        ("captions_wds", "webdataset"), ("captions_manifest", "jsonl"), ("videos", "video_folder"),
        ("text", "text"), ("conversations", "jsonl"), ("interleaved", "jsonl"), ("preferences", "parquet")]
    assert [s.name for s in recipe.steps] == ["probe", "tokens", "dedup_exact", "quality", "text_quality"]
    assert os.path.exists(os.path.join(corpus, "tokenizer", "tokenizer.json"))
    assert len(recipe.sources[0].paths) == 3
