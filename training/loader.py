"""The shard loader: blends reelforge shard sets, splits them across ranks and workers, decodes,
tokenises, packs, and remembers its exact position.

Order is a pure function of (seed, rank, worker, state), so a resumed run sees the same
samples in the same order as one that never stopped:

* **split**: a *slot* is one (rank, loader worker) pair, `slot = rank * workers + worker`.
  Each epoch every shard set's shards are put in a seeded order; with many shards each slot
  takes every `n_slots`-th shard, otherwise every slot reads the shards and keeps every
  `n_slots`-th sample (webdataset's own node splitter refuses several ranks, so the split is
  ours and explicit). Together the slots see each sample of an epoch exactly once.
* **blend**: within a slot the next sample comes from the set with the smallest
  `drawn_tokens / weight` (deterministic stride scheduling), so sets are mixed by tokens, not
  samples; a set that runs out starts its next epoch (or stops, with `data.epochs`).
* **pack**: samples are appended in order to a sequence until the next one does not fit
  (greedy, order-preserving); position ids restart at 0 for every sample, which is also how
  the model keeps attention inside each sample (block-diagonal causal mask), and labels are
  shifted per sample so no sample predicts its neighbour's first token.
* **state**: with every batch a worker hands back its state as it was before the first sample
  that is not in the batch (the one that did not fit is re-read on resume). The loader keeps
  the newest state per worker and how many batches the trainer took; on restore the worker
  whose turn was next gets DataLoader worker 0 (DataLoader hands batches out round-robin).
  A checkpoint of another ranks x workers resumes through `ShardLoader.resume` (training/elastic.py):
  the samples no finished step trained on are dealt over the new slots, each once.
"""

from __future__ import annotations

import copy
import glob
import io
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from reelforge.curation.errors import MediaReadError, ProbeError, RecipeError
from reelforge.curation.shards import parse_sample_json
from reelforge.curation.tokens import (
    TokenError,
    VisualTokenConfig,
    image_tokens,
    slow_fast_sizes,
    video_nframes,
    video_tokens,
)

IGNORE = -100
_PLACEHOLDER = re.compile(r"(<image>|<video>)")
STATE_VERSION = 1


# ----------------------------------------------------------------------------- shard sets

@dataclass
class ShardSet:
    """One named, weighted set of shards; `counts` come from the run's index.json when present."""

    name: str
    weight: float
    urls: list[str]
    counts: list[int | None] = field(default_factory=list)
    caption: str = "original"  # which text captions train on: original | latest | model:NAME | random


def _index_records(folder: str) -> dict[str, dict]:
    """Each shard's record in the folder's index.json (samples, bytes, sha256), by path (or URL)."""
    from reelforge.curation import storage

    p = storage.join(folder, "index.json")
    if not storage.exists(p):
        return {}
    idx = json.loads(storage.read_bytes(p))
    return {storage.join(folder, s["shard"]): s for s in idx.get("shards", [])}


def _file_sha256(path: str) -> str:
    import hashlib

    from reelforge.curation import storage

    h = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shard(url: str, rec: dict | None, verify: bool, where: str = "data.sources") -> None:
    """Refuses a shard that is not the one its index.json recorded: its sha256 is checked when `verify`
    (the stage's `data.verify`) and always when its size differs from the record's `bytes`."""
    if not rec:
        return  # no index.json record (tar paths from elsewhere): nothing to check against
    from reelforge.curation import storage

    size = storage.size(url)
    size_ok = rec.get("bytes") is None or int(rec["bytes"]) == size
    if size_ok and not (verify and rec.get("sha256")):
        return
    digest = _file_sha256(url)
    if size_ok and digest == rec["sha256"]:
        return
    raise RecipeError(f"stage field `{where}`: shard {url} is refused: it is not the shard its index.json recorded "
                      f"({size} bytes, sha256 {digest[:16]}...; recorded {rec.get('bytes')} bytes, sha256 "
                      f"{str(rec.get('sha256'))[:16]}...); copy it again from the run, or re-run `reelforge mix`.")


def resolve_shard_set(name: str, paths: list[str], weight: float = 1.0, where: str = "data.sources",
                      caption: str = "original", verify: bool = False) -> ShardSet:
    """Folders (their *.tar, with counts from index.json), globs or tar paths -> a ShardSet; each shard
    is checked against its index.json record (see check_shard)."""
    from reelforge.curation import storage

    urls: list[str] = []
    recs: dict[str, dict] = {}
    for p in paths:
        if storage.is_url(p):  # a stage folder, a glob or a tar on object storage (s3://bucket/mix/stage)
            found, folders = _url_shards(storage.normalize(p))
            for d in folders:
                recs.update(_index_records(d))
        elif os.path.isdir(p):
            recs.update(_index_records(p))
            found = sorted(glob.glob(os.path.join(p, "*.tar")))
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            for d in {os.path.dirname(f) for f in found}:
                recs.update(_index_records(d))
        else:
            found = [p] if os.path.isfile(p) else []
            if found:
                recs.update(_index_records(os.path.dirname(p)))
        if not found:
            raise RecipeError(f"stage field `{where}` ({name}): no .tar shards at {p}; point `path` at the "
                              "shards folder of a run (OUT/shards), a glob, or tar files.")
        urls.extend(found)
    for u in urls:
        check_shard(u, recs.get(u), verify, where)
    counts = {k: int(r["samples"]) for k, r in recs.items()}
    check_shard_version(urls[0])  # a newer layout is refused here, in one sentence, before any worker starts
    return ShardSet(name=name, weight=float(weight), urls=urls, counts=[counts.get(u) for u in urls],
                    caption=caption)


def _url_shards(url: str) -> tuple[list[str], list[str]]:
    """(tar URLs, folders holding them) for a URL that names a folder, a glob or one tar."""
    from reelforge.curation import storage

    if any(c in url for c in "*?["):
        fs, path = storage.url_fs(url)
        scheme = url.split("://", 1)[0]
        found = sorted(f"{scheme}://{f}" for f in storage.guarded(url, "read", fs.glob, path) if f.endswith(".tar"))
    elif url.endswith(".tar"):
        found = [url] if storage.exists(url) else []
    else:
        found = [storage.join(url, n) for n in storage.listdir(url) if n.endswith(".tar")]
    return found, sorted({f.rsplit("/", 1)[0] for f in found})


def open_shard(url: str):
    """Raw webdataset samples ({__key__, __url__, ext: bytes}) of one shard, streamed: a local tar
    through webdataset's own opener, a URL (s3://...) through fsspec (`storage.open_file`)."""
    import webdataset as wds

    from reelforge.curation import storage

    if not storage.is_url(url):
        return wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                              empty_check=False)
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def samples() -> Iterator[dict]:  # webdataset's own expander and grouping, over an fsspec stream
        with storage.open_file(url, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    return samples()


def check_shard_version(url: str) -> None:
    """Parse the first sample JSON of a shard: raises ShardVersionError for a layout this reelforge
    cannot read (every sample is checked again as it is read)."""
    import tarfile

    from reelforge.curation import storage

    try:
        with storage.open_file(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for ti in tf:
                if ti.isfile() and ti.name.endswith(".json"):
                    parse_sample_json(tf.extractfile(ti).read(), url)
                    return
    except (tarfile.TarError, OSError, ValueError):
        return  # unreadable shards are the reader's business (skipped and counted), not a version


def shard_sets_of(cfg) -> list[ShardSet]:
    return [resolve_shard_set(s["name"], s["path"], s["weight"], f"data.sources[{i}].path",
                              s.get("caption", "original"), bool(cfg.data.get("verify", False)))
            for i, s in enumerate(cfg.data["sources"])]


CAPTION_POLICIES = ("original", "latest", "random")  # or model:NAME


def caption_text(sample: dict, policy: str, seed: int) -> str:
    """The text a caption-type sample (image_text, video_text) trains on, by its shard set's policy:
    `original` the source's own caption; `latest` the last recaption (the original when there is
    none); `model:NAME` the last recaption written by model NAME (the original when it wrote none);
    `random` one of the original and the recaptions, drawn from (loader seed, sample id), so it is
    the same on every run and every resume."""
    original = sample.get("text") or ""
    caps = [c for c in sample.get("captions") or [] if c.get("text")]
    if policy == "original" or not caps:
        return original
    if policy == "latest":
        return caps[-1]["text"]
    if policy.startswith("model:"):
        name = policy[len("model:"):]
        mine = [c for c in caps if c.get("model") == name]
        return mine[-1]["text"] if mine else original
    if policy == "random":
        choices = [original] + [c["text"] for c in caps]
        return random.Random(f"{seed}:{sample['id']}").choice(choices)
    raise ValueError(f"unknown caption policy {policy!r}")


# ----------------------------------------------------------------------------- one set, one slot

class SlotStream:
    """One shard set as one slot sees it: raw webdataset samples, epoch after epoch.

    `pos` counts this slot's samples taken in the current epoch; restoring (epoch, pos) skips
    whole shards by their index counts and the rest without decoding anything.
    """

    def __init__(self, ss: ShardSet, seed: int, slot: int, n_slots: int, split: str, epoch: int = 0,
                 pos: int = 0, max_epochs: int | None = None, base: dict | None = None):
        self.ss, self.seed, self.slot, self.n_slots = ss, seed, slot, n_slots
        n = len(ss.urls)
        self.by_shards = split == "shards" or (split == "auto" and n >= 4 * n_slots)
        self.epoch, self.pos, self.max_epochs = epoch, pos, max_epochs
        self._it: Iterator[dict] | None = None
        # elastic resume (training.elastic): the epochs another slot count had begun, with the global
        # indices it consumed; this slot takes every n_slots-th of the rest of such an epoch
        self.base = base or {}
        self._masks: dict[int, np.ndarray] = {}

    def base_mask(self, epoch: int) -> np.ndarray | None:
        """The consumed samples of `epoch` (global indices) when the elastic base holds it, else None."""
        r = (self.base.get("epochs") or {}).get(str(epoch))
        if r is None:
            return None
        if epoch not in self._masks:
            from reelforge.training.elastic import decode_ranges

            self._masks[epoch] = decode_ranges(r, int(self.base["n"]))
        return self._masks[epoch]

    def assignment(self, epoch: int) -> np.ndarray:
        """This slot's samples of `epoch`, in the order it reads them, as global indices (a sample's place
        in the epoch's seeded shard order); needs every shard's count."""
        counts = [int(c) for c in self.ss.counts]
        mask = self.base_mask(epoch)
        if mask is not None:
            return np.flatnonzero(~mask)[self.slot::self.n_slots]
        if self.by_shards:
            order = self._order(epoch)
            offs = np.cumsum([0] + [counts[j] for j in order])
            return np.concatenate([np.arange(offs[p], offs[p] + counts[j]) for p, j in enumerate(order)
                                   if p % self.n_slots == self.slot] or [np.zeros(0, dtype=np.int64)])
        return np.arange(self.slot, sum(counts), self.n_slots)

    @staticmethod
    def shard_count(url: str) -> int:
        """How many samples a shard without an index.json record holds, read as the stream reads it."""
        return sum(1 for _ in open_shard(url))

    def _base_iter(self, epoch: int, skip: int) -> Iterator[dict]:
        """An epoch of the elastic base: this slot's share of the samples not yet consumed."""
        want = self.assignment(epoch)[skip:]
        i, g = 0, 0
        for j in self._order(epoch):
            if i >= len(want):
                return
            count = int(self.ss.counts[j])
            if want[i] >= g + count:
                g += count
                continue
            end = g + count
            for raw in open_shard(self.ss.urls[j]):
                if i < len(want) and g == want[i]:
                    i += 1
                    yield raw
                    if i >= len(want):
                        return
                g += 1
            g = end

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.ss.urls)))
        random.Random(f"{self.seed}:{self.ss.name}:{epoch}").shuffle(order)
        return order

    def _mine(self, off: int, count: int) -> int:
        """How many of global sample indices [off, off+count) fall to this slot (sample split)."""
        first = off + ((self.slot - off) % self.n_slots)
        return max(0, (off + count - first + self.n_slots - 1) // self.n_slots)

    def _epoch_iter(self, epoch: int, skip: int) -> Iterator[dict]:
        order = self._order(epoch)
        if self.by_shards:
            order = order[self.slot::self.n_slots]
        g = 0  # global sample index in this epoch (sample split)
        for j in order:
            url, count = self.ss.urls[j], self.ss.counts[j]
            if count is not None and skip > 0:
                mine = count if self.by_shards else self._mine(g, count)
                if mine <= skip:
                    skip -= mine
                    g += count
                    continue
            for raw in open_shard(url):
                k = g
                g += 1
                if not self.by_shards and k % self.n_slots != self.slot:
                    continue
                if skip > 0:
                    skip -= 1
                    continue
                yield raw

    def next(self) -> dict | None:
        """The next raw sample, or None once `max_epochs` are done."""
        while True:
            if self.max_epochs is not None and self.epoch >= self.max_epochs:
                return None
            in_base = self.base_mask(self.epoch) is not None
            if self._it is None:
                self._it = (self._base_iter if in_base else self._epoch_iter)(self.epoch, self.pos)
            raw = next(self._it, None)
            if raw is not None:
                self.pos += 1
                return raw
            self._it = None
            empty = self.pos == 0
            self.epoch, self.pos = self.epoch + 1, 0
            if empty and self.max_epochs is None and not in_base:
                return None  # this slot has no samples of this set at all


# ----------------------------------------------------------------------------- decode + tokenise

@dataclass
class Item:
    """One tokenised sequence: labels already shifted (label[t] is the target of position t)."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]
    id: str
    source: str
    kind: str
    role: str = "seq"
    extra: dict[str, Any] = field(default_factory=dict)
    entry: str | None = None  # the plan entry it was drawn for (report.entry_of), when the stage names a plan


FRAME, FAST_START, FAST_END = "<|frame|>", "<|fast_start|>", "<|fast_end|>"
PLAN_FIELDS = ("frame_indices", "frame_times", "frame_types", "slow_size", "fast_size")
DECODE_BATCH_BYTES = 256 << 20  # native-size RGB decoded at once for a planned video


@dataclass
class FrameLayout:
    """A planned Keye-VL-1.5 video's tokens between `<|vision_start|>` and `<|vision_end|>`, as the
    released processor lays them out: `texts[j]` comes before frame j's `pads[j]` `<|video_pad|>`
    tokens and `texts[-1]` after the last frame. Frame j's text is `<|frame|>` + its timestamp
    (`format(t, ".1f")`, seconds) + `<|fast_start|>` for a fast frame, after the previous frame's
    `<|fast_end|>` when that one was fast. Each text is tokenised whole, like the processor's prompt:
    with a tokenizer that has the three markers they are single tokens, else plain text."""

    texts: list[str]
    pads: list[int]

    @classmethod
    def of(cls, times: list[float], types: list[int], pads: list[int]) -> "FrameLayout":
        texts, pending = [], ""
        for t, fast in zip(times, types):
            texts.append(pending + FRAME + format(t, ".1f") + (FAST_START if fast else ""))
            pending = FAST_END if fast else ""
        return cls(texts + [pending], list(pads))


Medium = tuple[str, int, "FrameLayout | None"]  # (kind, visual tokens, the 1.5 layout of a planned video)


class Encoder:
    """Decodes media with the token rules of `curation.tokens` and tokenises with the model's template.

    A video whose shard carries its Keye-VL-1.5 frame plan (`plan` in the shard JSON: the probe
    step's frame indices, times and slow/fast types) is fed as the released 1.5 processor feeds it,
    when the stage's `data.visual` is keye-vl-1.5 and its numbers sample as many frames as the plan
    has (the rule of the `tokens` step, so the planner's count and the loader agree): exactly the
    planned frames, decoded at native size and resized (bilinear, antialiased, as torch's
    `interpolate`) to the slow or fast size the stage's numbers give for the plan's types (the
    plan's own sizes when the numbers are the curation's), each frame's pads introduced by
    `<|frame|>` and its timestamp, a fast frame's pads between `<|fast_start|>` and `<|fast_end|>`
    (see FrameLayout). Other videos (keye-vl-1.0, shards without a plan, another frame count) are
    sampled from their metadata, every frame at one size, their pads in one run."""

    def __init__(self, tokenizer_path: str, visual: dict | None, max_len: int, objective: str = "lm",
                 kinds: list[str] | None = None, max_text_len: int = 64, seed: int = 0):
        from transformers import AutoTokenizer

        self.seed = seed

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.vcfg = VisualTokenConfig.from_dict(visual)
        self.max_len, self.objective, self.kinds, self.max_text_len = max_len, objective, kinds, max_text_len
        ids = self.tok.convert_tokens_to_ids
        self.image_pad, self.video_pad = ids("<|image_pad|>"), ids("<|video_pad|>")
        self.vstart, self.vend = ids("<|vision_start|>"), ids("<|vision_end|>")
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self._cache: dict[str, list[int]] = {}

    # -- text
    def ids(self, text: str) -> list[int]:
        if len(text) < 64:
            hit = self._cache.get(text)
            if hit is None:
                hit = self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
                if len(self._cache) > 4096:
                    self._cache.clear()
            return list(hit)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], gen: bool = False) -> str:
        if not messages:
            return ""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def chat_segments(self, messages: list[dict], last_trainable_only: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is-assistant-answer) pieces."""
        segs: list[tuple[str, bool]] = []
        prev = ""
        n = len(messages)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self._render(messages[:i], gen=True)
                full = self._render(messages[: i + 1])
                if not head.startswith(prev) or not full.startswith(head):
                    raise ValueError("the chat template does not render conversations prefix by prefix")
                segs.append((head[len(prev):], False))
                segs.append((full[len(head):], not last_trainable_only or i == n - 1))
            else:
                full = self._render(messages[: i + 1])
                if not full.startswith(prev):
                    raise ValueError("the chat template does not render conversations prefix by prefix")
                segs.append((full[len(prev):], False))
            prev = full
        return segs

    def _tokens(self, segs: list[tuple[str, bool]], media: list[Medium]) -> tuple[list[int], list[bool]]:
        """Segments -> ids and trainable flags; each placeholder becomes start, pads x tokens, end
        (a planned 1.5 video: start, its FrameLayout, end)."""
        ids: list[int] = []
        train: list[bool] = []
        mi = 0
        for text, trainable in segs:
            for piece in _PLACEHOLDER.split(text):
                if not piece:
                    continue
                if piece in ("<image>", "<video>"):
                    if mi >= len(media):
                        raise ValueError("more placeholders than media")
                    kind, n, layout = media[mi]
                    mi += 1
                    pad = self.image_pad if kind == "image" else self.video_pad
                    block = [self.vstart]
                    if layout is None:
                        block += [pad] * n
                    else:
                        for t, k in zip(layout.texts, layout.pads):
                            block += (self.ids(t) if t else []) + [pad] * k
                        block += self.ids(layout.texts[-1]) if layout.texts[-1] else []
                    block.append(self.vend)
                    ids += block
                    train += [False] * len(block)
                else:
                    t = self.ids(piece)
                    ids += t
                    train += [trainable] * len(t)
        if mi != len(media):
            raise ValueError(f"{len(media)} media but {mi} placeholders")
        return ids, train

    @staticmethod
    def shift(ids: list[int], train: list[bool]) -> list[int]:
        labels = [ids[t + 1] if train[t + 1] else IGNORE for t in range(len(ids) - 1)]
        return labels + [IGNORE]

    # -- media
    def image(self, data: bytes) -> tuple[torch.Tensor, int]:
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (im.width, im.height))
        im = im.convert("RGB")
        c = self.vcfg
        r = image_tokens(im.height, im.width, c)
        if (r["resized_height"], r["resized_width"]) != (im.height, im.width):
            im = im.resize((r["resized_width"], r["resized_height"]), Image.BICUBIC)
        arr = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # a CHW view: a contiguous copy costs ~5 ms
        return arr, r["tokens"]

    def _planned(self, m: dict) -> bool:
        """Whether a video is fed by its stored 1.5 frame plan (see the class docstring)."""
        c = self.vcfg
        if not c.slow_fast or any(not m.get(k) for k in PLAN_FIELDS) or \
                m.get("plan_processor") not in (None, c.processor):
            return False
        n = len(m["frame_types"])
        if not len(m["frame_indices"]) == len(m["frame_times"]) == n:
            raise ValueError(f"a frame plan with {len(m['frame_indices'])} indices, {len(m['frame_times'])} "
                             f"times and {n} types; re-run the probe step on this video")
        try:
            return video_nframes(m.get("duration") or 0.0, m.get("fps"), c, total_frames=m.get("frames")) == n
        except TokenError:
            return False

    def planned_video(self, data: bytes, m: dict) -> tuple[list[torch.Tensor], int, FrameLayout]:
        """The plan's frames (slow and fast sizes in its order), their tokens and 1.5 layout."""
        from torch.nn.functional import interpolate

        from reelforge.curation.video import decode_frames

        idx, types = [int(i) for i in m["frame_indices"]], [int(t) for t in m["frame_types"]]
        step = max(1, DECODE_BATCH_BYTES // max(1, 3 * int(m.get("width") or 1) * int(m.get("height") or 1)))
        frames: list[torch.Tensor] = [torch.empty(0)] * len(idx)
        size: dict[int, list[int]] = {}
        per: dict[int, int] = {}
        tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(suffix="." + (m.get("format") or "mp4"), dir=tmpdir) as f:
            f.write(data)
            f.flush()
            for a in range(0, len(idx), step):
                arr = decode_frames(f.name, idx[a:a + step], past_end="clamp", threads=1)  # native size, upright
                if not size:  # the sizes the stage's numbers give for the plan's types, from the upright frame
                    fast = sum(1 for t in types if t)
                    s = slow_fast_sizes(arr.shape[1], arr.shape[2], len(types) - fast, fast, self.vcfg)
                    size = {0: [s["resized_height"], s["resized_width"]],
                            1: [s["fast_resized_height"], s["fast_resized_width"]]}
                    per = {0: s["tokens_per_frame"], 1: s["fast_tokens_per_frame"]}
                nat = torch.from_numpy(arr).permute(0, 3, 1, 2)  # N, C, H, W: a view of the decoded NHWC
                for kind in (0, 1):
                    mine = [j for j in range(len(arr)) if (1 if types[a + j] else 0) == kind]
                    if mine:
                        out = interpolate(nat[mine], size[kind], mode="bilinear", antialias=True)
                        for j, fr in zip(mine, out):
                            frames[a + j] = fr.contiguous()
        pads = [per[1 if t else 0] for t in types]
        # one 3D-position entry per pad run: each frame is its own run (see item_positions)
        rate = len(types) / m["frames"] * m["fps"] if m.get("frames") and m.get("fps") else 2.0
        self._fps.extend([float(rate)] * len(types))
        return frames, sum(pads), FrameLayout.of([float(t) for t in m["frame_times"]], types, pads)

    def video(self, data: bytes, m: dict) -> tuple[list[torch.Tensor], int]:
        from reelforge.curation.video import decode_frames, sample_indices

        c = self.vcfg
        v = video_tokens(m["height"], m["width"], m.get("duration") or 0.0, m.get("fps"), c,
                         total_frames=m.get("frames"))
        total = m.get("frames") or max(1, int(round((m.get("duration") or 0) * (m.get("fps") or 0))))
        idx = sample_indices(total, v["frames"])
        tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(suffix="." + (m.get("format") or "mp4"), dir=tmpdir) as f:
            f.write(data)
            f.flush()
            arr = decode_frames(f.name, idx, size=(v["resized_height"], v["resized_width"]), past_end="clamp",
                                threads=1)
        frames = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arr]
        # the sampling rate of the frames taken (keye-vl-utils' sample_fps): 3D positions use 1/fps
        # for this video's one pad run
        fps = v["frames"] / total * m["fps"] if m.get("fps") and total else 2.0
        self._fps.append(float(fps))
        return frames, v["tokens"]

    def media(self, raw: dict, meta: dict) -> tuple[list[torch.Tensor], list[Medium]]:
        """Decode the media of a parsed sample (`meta`: the row view, media members in the shard)."""
        images: list[torch.Tensor] = []
        counts: list[Medium] = []
        self._fps: list[float] = []
        sid = meta["id"]
        for m in meta.get("media") or []:
            key = m["member"][len(sid) + 1:] if m["member"].startswith(sid + ".") else m["member"].split(".", 1)[1]
            data = raw[key]
            layout = None
            if m["kind"] == "image":
                im, n = self.image(data)
                images.append(im)
            elif self._planned(m):
                frames, n, layout = self.planned_video(data, m)
                images.extend(frames)
            else:
                frames, n = self.video(data, m)
                images.extend(frames)
            counts.append((m["kind"], n, layout))
        return images, counts

    # -- one sample
    @staticmethod
    def parse(raw: dict) -> dict:
        """A raw webdataset sample's JSON -> the sample's row view (curation.schema's fields), through
        the one parser generated from the schema; a newer shard JSON version is refused."""
        return parse_sample_json(raw["json"], raw.get("__url__"))

    def encode(self, raw: dict, caption: str = "original") -> list[Item] | None:
        """Raw shard sample -> items for this objective, or None when it does not serve it;
        `caption` is the shard set's caption policy (see caption_text)."""
        meta = self.parse(raw)
        kind = meta["kind"]
        if self.kinds is not None and kind not in self.kinds:
            return None
        src = meta.get("source") or "?"
        obj = self.objective
        if obj == "mpo" and kind != "preference":
            return None
        if obj == "vit_contrastive" and (kind != "image_text" or len(meta.get("media") or []) != 1
                                         or meta["media"][0]["kind"] != "image"):
            return None
        if obj == "grpo" and not self._grpo_ok(meta):
            return None
        images, media = self.media(raw, meta)
        mk = dict(id=meta["id"], source=src, kind=kind)
        if getattr(self, "entries", None) is not None:  # set by the loader when the stage names a plan
            from reelforge.training.report import OUTSIDE, entry_of

            mk["entry"] = entry_of(meta, self.entries) or OUTSIDE
        vfps = {"video_fps": list(self._fps)} if self._fps else {}
        if obj == "vit_contrastive":
            t = self.ids(caption_text(meta, caption, self.seed))[: self.max_text_len]
            return [Item(input_ids=t, labels=[], images=images, **mk)]
        if obj == "grpo":
            msgs = meta["messages"]
            prompt = self._render(msgs[:-1], gen=True)
            ids, _ = self._tokens([(prompt, False)], media)
            return [Item(input_ids=ids, labels=[], images=images, extra={"reference": msgs[-1]["content"], **vfps},
                         **mk)]
        if obj == "mpo":
            out = []
            for role in ("chosen", "rejected"):
                msgs = list(meta.get("messages") or []) + [{"role": "assistant", "content": meta.get(role) or ""}]
                ids, train = self._tokens(self.chat_segments(msgs, last_trainable_only=True), media)
                out.append(Item(ids, self.shift(ids, train), images, role=role, extra=dict(vfps), **mk))
            if sum(len(i.input_ids) for i in out) > self.max_len:
                return None
            return out
        ids, train = self._sequence(meta, kind, media, caption)
        if len(ids) > self.max_len:
            if any(t in (self.image_pad, self.video_pad) for t in ids[self.max_len:]) or images and \
                    sum(n for _, n, _ in media) + 2 * len(media) > self.max_len:
                return None
            ids, train = ids[: self.max_len], train[: self.max_len]
            if any(t in (self.image_pad, self.video_pad) for t in ids[-1:]):
                return None
        return [Item(ids, self.shift(ids, train), images, extra=dict(vfps), **mk)]

    def _grpo_ok(self, meta: dict) -> bool:
        msgs = meta.get("messages") or []
        return meta["kind"] == "conversation" and len(msgs) >= 2 and msgs[-1]["role"] == "assistant"

    def _sequence(self, meta: dict, kind: str, media: list[Medium], caption: str = "original"
                  ) -> tuple[list[int], list[bool]]:
        if kind in ("image_text", "video_text"):
            tags = "".join("<image>" if k == "image" else "<video>" for k, _, _ in media)
            text = caption_text(meta, caption, self.seed)
            msgs = [{"role": "user", "content": tags}, {"role": "assistant", "content": text}]
            return self._tokens(self.chat_segments(msgs), media)
        if kind == "preference":
            msgs = list(meta.get("messages") or []) + [{"role": "assistant", "content": meta.get("chosen") or ""}]
            return self._tokens(self.chat_segments(msgs), media)
        if meta.get("messages"):
            return self._tokens(self.chat_segments(meta["messages"]), media)
        ids, train = self._tokens([(meta.get("text") or "", True)], media)
        return ids + [self.eos], train + [True]


# ----------------------------------------------------------------------------- one slot, all sets

# what a hostile or damaged sample can raise while it is decoded and tokenised: a bad size, bad JSON,
# a missing member, undecodable media (ProbeError from ffmpeg, MediaReadError), a pixel bomb
_UNUSABLE: tuple[type[BaseException], ...] = (TokenError, ValueError, OSError, KeyError, TypeError, ProbeError,
                                              MediaReadError, Image.DecompressionBombError)


def _fresh_state(names: list[str]) -> dict:
    z = {n: 0 for n in names}
    return {"sources": {n: {"epoch": 0, "pos": 0} for n in names}, "drawn": dict(z), "samples": dict(z),
            "skipped": dict(z), "done": []}


class SlotReader:
    """Blends the shard sets for one slot by tokens (or samples) and decodes the picks."""

    def __init__(self, sets: list[ShardSet], encoder: Encoder, seed: int, slot: int, n_slots: int, split: str,
                 blend: str, max_epochs: int | None, state: dict | None = None, elastic: dict | None = None):
        self.sets, self.enc, self.blend = sets, encoder, blend
        self.state = copy.deepcopy(state) if state else _fresh_state([s.name for s in sets])
        self.streams = {s.name: SlotStream(s, seed, slot, n_slots, split, **self.state["sources"][s.name],
                                           max_epochs=max_epochs, base=(elastic or {}).get(s.name))
                        for s in sets}

    def snapshot(self) -> dict:
        return copy.deepcopy(self.state)

    def _pick(self) -> ShardSet | None:
        live = [s for s in self.sets if s.name not in self.state["done"]]
        if not live:
            return None
        return min(live, key=lambda s: (self.state["drawn"][s.name] / s.weight, self.sets.index(s)))

    def next(self) -> list[Item] | None:
        """The items of the next sample that serves the objective; None when every set is done."""
        while True:
            ss = self._pick()
            if ss is None:
                return None
            st = self.streams[ss.name]
            raw = st.next()
            self.state["sources"][ss.name] = {"epoch": st.epoch, "pos": st.pos}
            if raw is None:
                self.state["done"].append(ss.name)
                continue
            try:
                items = self.enc.encode(raw, ss.caption)
            except _UNUSABLE as e:  # a sample the loader cannot use: skipped and counted, never the run's end
                items = None
                self.state.setdefault("errors", {}).setdefault(ss.name, 0)
                self.state["errors"][ss.name] += 1
                del e
            if not items:
                self.state["skipped"][ss.name] += 1
                # a set with nothing for this objective still advances its counter, so others get picked
                self.state["drawn"][ss.name] += 1
                continue
            self.state["drawn"][ss.name] += (sum(len(i.input_ids) for i in items) if self.blend == "tokens" else 1)
            self.state["samples"][ss.name] += 1
            return items


# ----------------------------------------------------------------------------- batches

def item_positions(it: Item, mrope: dict) -> torch.Tensor:
    """3D position ids (3, n) of one item (`training.positions`, Keye-VL's rule): each image is a grid
    (1, H/patch, W/patch); each run of video pads takes its frames in order until their tokens fill
    it, frame k of the run its own grid at time k / fps, fps being the run's entry of the item's
    `video_fps` (one per run, 2.0 when missing). A 1.0 video is one run; a planned 1.5 video has one
    run per frame (text between them), so each of its frames is a one-frame grid at temporal offset
    0, the released Keye-VL-1.5 rule, whatever its rate."""
    from reelforge.training.positions import rope_index

    patch, merge = mrope["patch"], mrope.get("merge", 2)
    ip, vp = mrope["image_pad"], mrope["video_pad"]
    ids = it.input_ids
    grids, videos = [], []
    fi = vi = 0
    fps = it.extra.get("video_fps") or []
    p = 0
    while p < len(ids):
        if ids[p] not in (ip, vp):
            p += 1
            continue
        q = p
        while q < len(ids) and ids[q] == ids[p]:
            q += 1
        if ids[p] == ip:
            h, w = it.images[fi].shape[1:]
            grids.append([1, h // patch, w // patch])
            fi += 1
        else:
            rate = fps[vi] if vi < len(fps) else 2.0
            frames, got = [], 0
            while got < q - p:
                h, w = it.images[fi].shape[1:]
                spg = torch.tensor(1.0 / rate, dtype=torch.float32)
                frames.append((h // patch, w // patch, float(len(frames) * spg)))
                got += (h // patch // merge) * (w // patch // merge)
                fi += 1
            videos.append(frames)
            vi += 1
        p = q
    return rope_index(ids, grids or None, image_token_id=ip, video_token_id=vp, video_frames=videos,
                      spatial_merge_size=merge)


def collate_packed(packs: list[list[Item]], pad_id: int, mrope: dict | None = None) -> dict:
    """Packs -> tensors (B, L): ids, shifted labels, per-sample position ids, segment ids, images in order.

    With `mrope` ({image_pad, video_pad, patch}: the stage's `data.positions: mrope`) position_ids
    are Keye-VL's 3D rotary positions, (3, B, L), restarting per sample; padding counts 0, 1, ..."""
    rows, labels, pos, seg = [], [], [], []
    images: list[torch.Tensor] = []
    samples: list[dict] = []
    k = 0
    for pack in packs:
        r, lab, p, s = [], [], [], []
        for it in pack:
            n = len(it.input_ids)
            r += it.input_ids
            lab += it.labels
            p += item_positions(it, mrope).t().tolist() if mrope else list(range(n))
            s += [k] * n
            images += it.images
            samples.append({"id": it.id, "source": it.source, "kind": it.kind, "role": it.role, "tokens": n,
                            "segment": k, "entry": it.entry})
            k += 1
        rows.append(r)
        labels.append(lab)
        pos.append(p)
        seg.append(s)
    L = max(len(r) for r in rows)
    for i in range(len(rows)):
        pad = L - len(rows[i])
        rows[i] += [pad_id] * pad
        labels[i] += [IGNORE] * pad
        pos[i] += [[j] * 3 for j in range(pad)] if mrope else list(range(pad))
        seg[i] += [-1] * pad
    position_ids = torch.tensor(pos)
    if mrope:
        position_ids = position_ids.permute(2, 0, 1).contiguous()  # (B, L, 3) -> (3, B, L)
    return {"input_ids": torch.tensor(rows), "labels": torch.tensor(labels), "position_ids": position_ids,
            "segment_ids": torch.tensor(seg), "images": images, "samples": samples,
            "tokens": sum(s["tokens"] for s in samples)}


def packed_batches(reader: SlotReader, max_len: int, batch_size: int, pad_id: int, pack: bool = True,
                   mrope: dict | None = None) -> Iterator[tuple[dict, dict]]:
    """(batch, state) pairs; the state is the reader's before the first sample not in the batch."""
    packs: list[list[Item]] = []
    cur: list[Item] = []
    cur_len = 0
    while True:
        snap = reader.snapshot()
        got = reader.next()
        if got is None:
            if cur:
                packs.append(cur)
            if packs:
                yield collate_packed(packs, pad_id, mrope), reader.snapshot()
            return
        n = sum(len(i.input_ids) for i in got)
        if cur and (not pack or cur_len + n > max_len):
            packs.append(cur)
            cur, cur_len = [], 0
            if len(packs) == batch_size:
                yield collate_packed(packs, pad_id, mrope), snap
                packs = []
        cur += got
        cur_len += n


def list_batches(reader: SlotReader, batch_size: int) -> Iterator[tuple[dict, dict]]:
    """Unpacked batches of `batch_size` samples (contrastive pairs, GRPO prompts)."""
    items: list[Item] = []
    while True:
        got = reader.next()
        if got is not None:
            items += got
        if items and (got is None or len(items) >= batch_size):
            yield {"items": items, "samples": [{"id": i.id, "source": i.source, "kind": i.kind, "role": i.role,
                                                "tokens": len(i.input_ids), "entry": i.entry} for i in items],
                   "tokens": sum(len(i.input_ids) for i in items)}, reader.snapshot()
            items = []
        if got is None:
            return


class _SlotDataset(torch.utils.data.IterableDataset):
    def __init__(self, spec: dict, sets: list[ShardSet], states: dict[int, dict], rotation: int):
        super().__init__()
        self.spec, self.sets, self.states, self.rotation = spec, sets, states, rotation

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        k = self.spec["workers"]
        w = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        v = (w + self.rotation) % k
        slot = self.spec["rank"] * k + v
        sp = self.spec
        enc = Encoder(sp["tokenizer"], sp["visual"], sp["max_len"], sp["objective"], sp["kinds"], sp["max_text_len"],
                      sp["seed"])
        enc.entries = sp.get("entries")
        reader = SlotReader(self.sets, enc, sp["seed"], slot, sp["world"] * k, sp["split"], sp["blend"],
                            sp["epochs"], self.states.get(v), sp.get("elastic"))
        if sp["objective"] in ("lm", "mpo"):
            mrope = None
            if sp.get("positions") == "mrope":
                mrope = {"image_pad": enc.image_pad, "video_pad": enc.video_pad, "patch": enc.vcfg.patch_size,
                         "merge": enc.vcfg.merge_size}
            it = packed_batches(reader, sp["max_len"], sp["batch_size"], enc.pad, sp["pack"], mrope)
        else:
            it = list_batches(reader, sp["batch_size"])
        for batch, state in it:
            batch["_worker"], batch["_state"] = v, state
            yield batch


def _entries_of(cfg) -> list[dict] | None:
    """The plan entries samples are attributed to (report.plan_entries), or None."""
    from reelforge.training.report import plan_entries

    try:
        return plan_entries(cfg)
    except (OSError, ValueError, AttributeError, KeyError):
        return None  # no readable planner plan: samples are counted by source and set only


class ShardLoader:
    """Iterable of batches for one data-parallel rank, with `state_dict`/`load_state_dict`."""

    def __init__(self, cfg, rank: int = 0, world: int = 1, sets: list[ShardSet] | None = None):
        d = cfg.data
        tok = cfg.model["tokenizer"] or cfg.model["llm"] or (os.path.join(cfg.model["init"], "tokenizer")
                                                             if cfg.model["init"] else None)
        if tok is None or not os.path.isdir(tok):
            raise RecipeError("stage field `model.tokenizer` must be a tokenizer folder (default: `model.llm`).")
        self.sets = sets or shard_sets_of(cfg)
        self.workers = max(1, d["num_workers"])
        self.spec = {"rank": rank, "world": world, "workers": self.workers, "tokenizer": tok,
                     "visual": d["visual"], "max_len": d["max_len"], "objective": cfg.objective,
                     "kinds": d["kinds"], "max_text_len": d["max_text_len"], "seed": cfg.seed, "split": d["split"],
                     "blend": d["blend"], "epochs": d["epochs"], "batch_size": d["batch_size"], "pack": d["pack"],
                     "positions": d.get("positions", "1d"), "entries": _entries_of(cfg)}
        self.num_workers, self.prefetch = d["num_workers"], d["prefetch"]
        self._states: dict[int, dict] = {}
        self.consumed = 0
        self.seen: dict[str, int] = {}
        self.seen_tokens: dict[str, int] = {}
        self.seen_entries: dict[str, int] = {}  # by plan entry (report.entry_of), when the stage names a plan

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.spec["rank"], "world": self.spec["world"],
                "workers": self.workers, "consumed": self.consumed, "states": copy.deepcopy(self._states),
                "seen": dict(self.seen), "seen_tokens": dict(self.seen_tokens),
                "seen_entries": dict(self.seen_entries), "elastic": copy.deepcopy(self.spec.get("elastic"))}

    def load_state_dict(self, st: dict) -> None:
        """One rank's state from a run of the same size (`resume` takes every rank's, of any size)."""
        if (st.get("world"), st.get("workers")) != (self.spec["world"], self.workers):
            raise RecipeError(f"the checkpoint's loader ran {st.get('world')} ranks x {st.get('workers')} workers, "
                              f"this one {self.spec['world']} x {self.workers}; pass every rank's state to "
                              "`ShardLoader.resume`, which redistributes the samples left.")
        self.spec["elastic"] = copy.deepcopy(st.get("elastic"))
        self._states = {int(k): v for k, v in st["states"].items()}
        self.consumed = int(st["consumed"])
        self.seen = dict(st.get("seen", {}))
        self.seen_tokens = dict(st.get("seen_tokens", {}))
        self.seen_entries = dict(st.get("seen_entries", {}))

    def resume(self, states: list[dict]) -> bool:
        """Every rank's saved state (a checkpoint's `loader` list) -> this rank's position. The same ranks x
        workers resume exactly where they were (same samples, same order); another size gets the samples
        that no finished step trained on, each once, dealt over the new slots (`training.elastic`).
        True when the size changed."""
        st = states[0]
        if (st.get("world"), st.get("workers")) == (self.spec["world"], self.workers):
            self.load_state_dict(states[self.spec["rank"]])
            return False
        import sys

        from reelforge.training.elastic import resume_states

        self.load_state_dict(resume_states(states, self.sets, self.spec["seed"], self.spec["split"],
                                           self.spec["rank"], self.spec["world"], self.workers,
                                           sys.modules[__name__]))
        return True

    def __iter__(self) -> Iterator[dict]:
        ds = _SlotDataset(self.spec, self.sets, dict(self._states), self.consumed % self.workers)
        if self.num_workers > 0:
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=self.prefetch, persistent_workers=False)
        else:
            dl = ds
        for b in dl:
            self._states[b.pop("_worker")] = b.pop("_state")
            self.consumed += 1
            for s in b["samples"]:
                if s["role"] != "rejected":
                    self.seen[s["source"]] = self.seen.get(s["source"], 0) + 1
                    if s.get("entry") is not None:
                        self.seen_entries[s["entry"]] = self.seen_entries.get(s["entry"], 0) + 1
                self.seen_tokens[s["source"]] = self.seen_tokens.get(s["source"], 0) + s["tokens"]
            yield b


def iter_ids(loader: ShardLoader, limit: int | None = None, on_batch: Callable[[dict], None] | None = None
             ) -> list[str]:
    """Sample ids in the order the loader yields them (tests, debugging)."""
    out: list[str] = []
    for i, b in enumerate(loader):
        if on_batch:
            on_batch(b)
        out += [s["id"] for s in b["samples"] if s["role"] != "rejected"]
        if limit is not None and i + 1 >= limit:
            break
    return out
