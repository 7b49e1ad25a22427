"""reelforge samples through Megatron Energon: a sample type and the cooker of our crude dataset.

Every shard folder reelforge writes (a run's `shards/`, each `mix` stage folder) carries Energon's
metadata (`curation/energon_meta.py`): `.nv-meta/dataset.yaml` names Energon's `CrudeWebdataset`
with the subflavor `reelforge: <shard JSON version>`. Energon hands the crude sample (a dict of the
tar members) to a cooker; `cook_reel` turns it into a `ReelSample`: the sample JSON as written, its
row view (every field of the schema, `curation.schema.from_shard_json`), the media bytes in the
order the JSON lists them, images decoded (PIL, RGB), and the metadata (`meta`, scores, tokens).

    from megatron.energon import WorkerConfig, get_train_dataset, get_loader
    from reelforge.training.energon import ReelTaskEncoder

    wc = WorkerConfig(rank=0, world_size=1, num_workers=2)
    ds = get_train_dataset("out/shards", worker_config=wc, batch_size=None, shuffle_buffer_size=None,
                           max_samples_per_sequence=None, task_encoder=ReelTaskEncoder())
    for sample in get_loader(ds):   # ReelSample
        sample.row["messages"], sample.images[0], sample.meta

A task encoder of your own adds `ReelCooker()` (or `Cooker(cook_reel, ...)`) to its `cookers`
and sets `decoder = None`: the cooker wants the members' bytes as written, not Energon's
default decoding (images to tensors, videos to AV decoders, JSON to dicts). Videos stay bytes:
`ReelSample.video(i)` opens Energon's `AVDecoder` on one when you want frames.

Needs the `energon` extra (`pip install 'reelforge[energon]'`: megatron-energon, av).
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

from megatron.energon import Cooker, DefaultTaskEncoder, Sample, edataclass, stateless

from reelforge.curation.energon_meta import SUBFLAVOR
from reelforge.curation.shards import SHARD_JSON_VERSION, parse_sample_json


@edataclass
class ReelSample(Sample):
    """One reelforge sample as Energon loads it (`__key__` is its key in the shard: the id, or
    `ID_rR` for a mix stage's repeat r of it)."""

    #: the sample's id (the same for every repeat of it)
    id: str
    #: image_text, video_text, interleaved, text, ...
    kind: Optional[str]
    #: the source (recipe source name) the sample came from
    source: Optional[str]
    #: the `.json` member's bytes, as written
    raw_json: bytes
    #: the `.json` member parsed: every field of the sample at its documented path
    record: dict
    #: the row view of the JSON: every field of the sample schema (absent ones None)
    row: dict
    #: the media bytes, in the order of `record["media"]`
    media: list
    #: the media descriptors of the JSON (member, kind, format, width, height, sha256, ...)
    media_info: list
    #: each medium decoded when it is an image (PIL.Image, RGB), else None
    images: list
    #: `meta` parsed (the JSON object the steps recorded: parameters, seeds, task fields), or {}
    meta: dict

    def video(self, i: int):
        """Energon's `AVDecoder` over medium i (a video)."""
        from megatron.energon.av import AVDecoder

        return AVDecoder(io.BytesIO(self.media[i]))


def _part(key: str, member: str) -> str:
    """A media member's part name in Energon's crude sample: `ID.0.jpg` -> `0.jpg`."""
    return member[len(key) + 1:] if member.startswith(key + ".") else member.split(".", 1)[1]


def _decode_image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB") if im.mode != "RGB" else im


def cook(crude: dict, decode_images: bool = True) -> ReelSample:
    """Energon's crude sample (its tar members as bytes) -> ReelSample."""
    key = crude["__key__"]
    raw = crude["json"]
    record = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else dict(raw)
    raw = (bytes(raw) if isinstance(raw, (bytes, bytearray)) else raw.encode() if isinstance(raw, str)
           else json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    row = parse_sample_json(record, shard=None)
    infos = list(record.get("media") or [])
    media, images = [], []
    for m in infos:
        part = _part(key, m["member"])
        if part not in crude:
            raise KeyError(f"sample {key}: its JSON lists the medium {m['member']} but the shard has no such member")
        data = bytes(crude[part])
        media.append(data)
        images.append(_decode_image(data) if decode_images and m.get("kind") == "image" else None)
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = {"_raw": meta}
    prov = record.get("provenance") or {}
    fields = {f: crude[f] for f in ("__key__", "__restore_key__", "__subflavors__", "__sources__") if f in crude}
    return ReelSample(**fields, id=record.get("id", key), kind=record.get("kind"),
                      source=prov.get("source", row.get("source")), raw_json=raw, record=record, row=row, media=media,
                      media_info=infos, images=images, meta=meta if isinstance(meta, dict) else {})


@stateless
def cook_reel(crude: dict) -> ReelSample:
    """The cooker of reelforge's crude dataset (images decoded)."""
    return cook(crude)


@stateless
def cook_reel_raw(crude: dict) -> ReelSample:
    """The cooker of reelforge's crude dataset, images left as bytes (`images` all None)."""
    return cook(crude, decode_images=False)


def ReelCooker(decode_images: bool = True, version: Any = SHARD_JSON_VERSION) -> Cooker:
    """Energon's Cooker for the folders reelforge writes (those whose dataset.yaml has the
    subflavor `reelforge: <version>`)."""
    return Cooker(cook_reel if decode_images else cook_reel_raw, has_subflavors={SUBFLAVOR: version})


class ReelTaskEncoder(DefaultTaskEncoder):
    """Energon's default task encoder with reelforge's cooker and no default decoding; a batch
    (with `batch_size`) is a list of ReelSample."""

    decoder = None

    def __init__(self, decode_images: bool = True):
        self.cookers = [ReelCooker(decode_images)]
        super().__init__()

    def batch(self, samples: list) -> list:
        return list(samples)
