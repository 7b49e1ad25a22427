"""Energon-native output: every shard folder carries `.nv-meta/`, and Energon's own loader reads
it (no `energon prepare`) into reelforge's sample type, with the bytes the tars hold."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import Counter

import pytest
import yaml
from megatron.energon import WorkerConfig, get_loader, get_train_dataset
from PIL import Image

from reelforge.curation.energon_meta import dataset_yaml, write_energon_meta
from reelforge.curation.errors import RecipeError
from reelforge.curation.shards import ShardFile, encode_json, parse_sample_json
from reelforge.training.energon import ReelSample, ReelTaskEncoder

pytestmark = pytest.mark.slow


def _tar_samples(folder: str) -> dict[str, dict[str, bytes]]:
    """key -> {part: bytes} of every sample of the folder's tars, read with tarfile (the reference)."""
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile():
                    key, part = m.name.split(".", 1)
                    out.setdefault(key, {})[part] = tf.extractfile(m).read()
    return out


def _read_world(path: str, world: int, workers: int, decode_images: bool = True) -> list[list[ReelSample]]:
    """One epoch of every rank's Energon loader (ranks x workers), each rank's samples in order."""
    per_rank = []
    for rank in range(world):
        wc = WorkerConfig(rank=rank, world_size=world, num_workers=workers)
        ds = get_train_dataset(path, worker_config=wc, batch_size=None, shuffle_buffer_size=None,
                               max_samples_per_sequence=None, repeat=False,
                               task_encoder=ReelTaskEncoder(decode_images=decode_images))
        per_rank.append(list(get_loader(ds)))
    return per_rank


def test_run_shards_read_by_energon_two_ranks_two_workers(demo_run):
    folder = os.path.join(demo_run["out"], "shards")
    meta = os.path.join(folder, ".nv-meta")
    for name in ("dataset.yaml", "split.yaml", ".info.json", "index.sqlite", "index.uuid"):
        assert os.path.isfile(os.path.join(meta, name)), name
    with open(os.path.join(meta, "dataset.yaml")) as f:
        assert yaml.safe_load(f) == dataset_yaml()
    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    with open(os.path.join(meta, ".info.json")) as f:
        assert json.load(f)["shard_counts"] == {s["shard"]: s["samples"] for s in index["shards"]}

    ref = _tar_samples(folder)
    assert len(ref) == index["samples"] > 20
    per_rank = _read_world(folder, world=2, workers=2)
    keys = [s.__key__ for r in per_rank for s in r]
    assert all(len(r) > 0 for r in per_rank)  # both ranks get a share
    assert Counter(keys) == Counter(set(ref)), "every sample exactly once across 2 ranks x 2 workers"
    assert not set(s.__key__ for s in per_rank[0]) & set(s.__key__ for s in per_rank[1])

    kinds, n_media, n_images, n_videos = Counter(), 0, 0, 0
    for s in (s for r in per_rank for s in r):
        parts = ref[s.__key__]
        assert s.raw_json == parts["json"]  # the JSON member, byte for byte
        assert s.record == json.loads(parts["json"])
        assert s.row == parse_sample_json(parts["json"]) and s.id == s.record["id"] == s.row["id"]
        media_parts = sorted(p for p in parts if p != "json")
        assert len(s.media) == len(s.media_info) == len(media_parts)
        assert sorted(m["member"].split(".", 1)[1] for m in s.media_info) == media_parts
        for data, info, img in zip(s.media, s.media_info, s.images):
            assert data == parts[info["member"].split(".", 1)[1]]  # the medium, byte for byte
            if info["kind"] == "image":
                n_images += 1
                want = Image.open(io.BytesIO(data)).convert("RGB")
                assert img.size == want.size == (info["width"], info["height"])
                assert img.tobytes() == want.tobytes()
            else:
                assert img is None
                n_videos += 1
        n_media += len(s.media)
        kinds[s.kind] += 1
        assert s.source == s.row["source"] and s.__subflavors__ == {"reelforge": 2}
        assert isinstance(s.meta, dict)
    assert n_images > 0 and n_videos > 0, (n_images, n_videos)
    print(f"\nenergon 2 ranks x 2 workers: {len(keys)} samples ({len(per_rank[0])} + {len(per_rank[1])}), "
          f"{n_media} media ({n_images} images, {n_videos} videos) identical; kinds {dict(kinds)}")

    # a video opens through Energon's AV decoder
    vid = next((s, i) for r in per_rank for s in r for i, m in enumerate(s.media_info) if m["kind"] == "video")
    dec = vid[0].video(vid[1])
    assert dec.get_video_duration()[0] > 0


@pytest.fixture(scope="module")
def mix(demo_run, tmp_path_factory) -> tuple[str, dict]:
    """`reelforge mix` of the demo mixture over the session's demo run: (out, stage -> index)."""
    from test_mix_plan_emit import demo_mixture

    from reelforge.mixers.emit import emit_plan
    from reelforge.mixers.planner import plan_mixture
    from reelforge.mixers.spec import parse_mixture

    out = str(tmp_path_factory.mktemp("mix"))
    plan = plan_mixture(parse_mixture(demo_mixture(demo_run["out"])), demo_run["out"])
    return out, emit_plan(plan, out, log=lambda *a: None)


def test_mix_stage_folders_read_by_energon(mix):
    out, indexes = mix
    repeats = 0
    for stage, index in indexes.items():
        folder = os.path.join(out, stage)
        ref = _tar_samples(folder)
        assert len(ref) == index["samples"] > 0
        got = [s for r in _read_world(folder, world=1, workers=0, decode_images=False) for s in r]
        assert Counter(s.__key__ for s in got) == Counter(set(ref)), stage
        for s in got:
            assert s.raw_json == ref[s.__key__]["json"]
            assert [m for m in s.media] == [ref[s.__key__][i["member"].split(".", 1)[1]] for i in s.media_info]
            repeats += s.__key__ != s.id  # a repeat: key ID_rR, the id stays the sample's
    assert repeats > 0  # the demo mixture repeats interleaved samples: their rekeyed members are found
    sizes = ", ".join(f"{k} {v['samples']}" for k, v in indexes.items())
    print(f"\nenergon mix stages: {sizes} samples read whole, {repeats} repeats (key ID_rR) among them")


def _folder(root: str, name: str, n: int, shards: int) -> str:
    """A folder of `shards` tars of text samples keyed `name-i`, written by reelforge's ShardFile."""
    d = os.path.join(root, name)
    os.makedirs(d)
    for k in range(shards):
        sf = ShardFile(os.path.join(d, f"{name}-{k:06d}.tar"))
        for i in range(k, n, shards):
            sid = f"{name}-{i:05d}"
            sf.write({"__key__": sid, "json": encode_json({"version": 2, "id": sid, "kind": "text", "text": name,
                                                           "provenance": {"source": name}})}, name)
        sf.close()
    assert write_energon_meta(d) == {"shards": shards, "samples": n}
    return d


def test_energon_blend_of_two_stage_folders_by_weight(mix):
    """Issue 17: Energon's blend of two stage folders that `reelforge mix` wrote, weighted 3:1, yields
    shares of 0.75 / 0.25 within 2%; every sample is one of its folder's, with the JSON its tar holds."""
    out, indexes = mix
    stages = sorted(indexes, key=lambda k: -indexes[k]["samples"])[:2]
    a, b = (os.path.join(out, k) for k in stages)
    ref = {a: _tar_samples(a), b: _tar_samples(b)}
    assert all(len(ref[d]) == indexes[k]["samples"] > 0 for d, k in zip((a, b), stages))
    mds = os.path.join(out, "blend.yaml")
    with open(mds, "w") as f:
        yaml.safe_dump({"__module__": "megatron.energon", "__class__": "MetadatasetV2",
                        "splits": {"train": {"blend": [{"weight": 3, "path": a}, {"weight": 1, "path": b}]}}}, f)
    n = 8000
    wc = WorkerConfig(rank=0, world_size=1, num_workers=0)
    ds = get_train_dataset(mds, worker_config=wc, batch_size=None, shuffle_buffer_size=None,
                           max_samples_per_sequence=None, task_encoder=ReelTaskEncoder(decode_images=False))
    got = Counter()
    for i, s in enumerate(get_loader(ds)):
        (src,) = {os.path.realpath(str(x.dataset_path)) for x in s.__sources__}
        folder = a if src == os.path.realpath(a) else b
        assert src == os.path.realpath(folder), (src, a, b)
        assert s.raw_json == ref[folder][s.__key__]["json"], (folder, s.__key__)
        got[folder] += 1
        if i + 1 == n:
            break
    share = got[a] / n
    print(f"\nenergon blend 3:1 of the mix stages {stages[0]} ({len(ref[a])} samples) and {stages[1]} "
          f"({len(ref[b])} samples) over {n} draws: {stages[0]} {share:.4f} (expected 0.75), "
          f"{stages[1]} {got[b] / n:.4f} (expected 0.25)")
    # by weight, not by size: by size the larger stage would take its share of the samples
    assert got[a] + got[b] == n and abs(share - 0.75) < 0.02
    assert abs(len(ref[a]) / (len(ref[a]) + len(ref[b])) - 0.75) > 0.04


def test_meta_is_replaced_and_duplicates_refused(tmp_path):
    d = _folder(str(tmp_path), "gamma", 10, 2)
    os.remove(os.path.join(d, "gamma-000001.tar"))
    assert write_energon_meta(d) == {"shards": 1, "samples": 5}
    assert not os.path.exists(os.path.join(d, "gamma-000001.tar.idx"))  # the old shard's tar index went too
    sf = ShardFile(os.path.join(d, "gamma-000009.tar"))
    sf.write({"__key__": "gamma-00000", "json": encode_json({"version": 2, "id": "gamma-00000"})}, "gamma")
    sf.close()
    with pytest.raises(RecipeError, match="unique"):
        write_energon_meta(d)
    assert not os.path.exists(os.path.join(d, ".nv-meta"))


def test_without_energon_nothing_is_written_and_it_says_so(tmp_path, monkeypatch):
    import reelforge.curation.energon_meta as em

    d = _folder(str(tmp_path), "delta", 4, 1)
    monkeypatch.setattr(em, "energon_available", lambda: False)
    said = []
    assert em.write_energon_meta(d, log=said.append) is None
    assert not os.path.exists(os.path.join(d, ".nv-meta")) and "reelforge[energon]" in said[0]
