"""The `clips` step: cut videos at shot boundaries (at most `max_clip_s` long) and/or
transcode them to a normalised H.264 MP4.

A video that becomes several clips leaves the pipeline as `split_into_clips` and each clip
enters as a new sample whose `parent_id` names it, so the ledger still accounts for
everything: inputs + derived = kept + dropped. Clip files are written under the run's
`_work/media/` folder (a filesystem every executor can write, like the shards').
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from typing import Any

from curation.media_io import MediaReadError, read_media_bytes
from curation.probe import ProbeError
from curation.schema import drop, make_id
from curation.step import RowStep


class VideoClips(RowStep):
    name = "clips"
    batch_rows = 8

    def __init__(self, max_clip_s: float = 60.0, scene_threshold: float = 0.3, min_clip_s: float = 0.5,
                 split: bool = True, transcode: dict | None = None, timeout_s: float = 300.0, **kw: Any):
        super().__init__(**kw)
        self.max_clip_s = float(max_clip_s)
        self.scene_threshold = float(scene_threshold)
        self.min_clip_s = float(min_clip_s)
        self.split = bool(split)
        self.transcode = dict(transcode) if transcode else None
        if self.transcode is not None:
            unknown = set(self.transcode) - {"max_side", "fps", "crf"}
            if unknown:
                raise ValueError(f"transcode takes max_side, fps and crf, not {sorted(unknown)}")
        self.timeout_s = float(timeout_s)
        self.workdir: str | None = None  # set by the job runner

    def process_rows(self, rows: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in rows:
            media = row.get("media") or []
            if row.get("drop_step") is not None or len(media) != 1 or media[0]["kind"] != "video":
                out.append(row)
                continue
            try:
                out.extend(self._clip(row))
            except (ProbeError, MediaReadError) as e:
                out.append(drop(row, self.name, e.reason, e.detail))
            except Exception as e:  # noqa: BLE001 - one bad video never fails the job
                out.append(drop(row, self.name, "error", f"{type(e).__name__}: {e}"[:500]))
        return out

    def _clip(self, row: dict) -> list[dict]:
        from curation import video

        m = row["media"][0]
        dest = os.path.join(self.workdir or tempfile.gettempdir(), "media", row["id"][:2])
        os.makedirs(dest, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = m["uri"]
            if m.get("offset") is not None:  # inside a tar: ffmpeg needs a seekable file
                src = os.path.join(tmp, "in" + os.path.splitext(m.get("member") or ".mp4")[1])
                with open(src, "wb") as f:
                    f.write(read_media_bytes(m))
            duration = float(m.get("duration") or 0.0)
            cuts = (video.detect_shots(src, threshold=self.scene_threshold, min_shot_s=self.min_clip_s,
                                       timeout_s=self.timeout_s) if self.split else [])
            spans = video.split_shots(duration, cuts, self.max_clip_s) if self.split else [(0.0, duration)]
            if len(spans) <= 1 and self.transcode is None:
                return [row]
            tc = self.transcode or {}
            if len(spans) <= 1:  # one clip: transcode in place, same sample
                path = os.path.join(dest, f"{row['id']}.mp4")
                video.transcode(src, path, max_side=tc.get("max_side"), fps=tc.get("fps"),
                                crf=tc.get("crf", 23), timeout_s=self.timeout_s)
                row["media"] = [self._probed(path, m)]
                return [row]
            children = []
            for i, (start, end) in enumerate(spans):
                path = os.path.join(dest, f"{row['id']}_{i:03d}.mp4")
                video.cut_clip(src, start, end, path, timeout_s=self.timeout_s, max_side=tc.get("max_side"),
                               fps=tc.get("fps"), crf=tc.get("crf", 23))
                child = copy.deepcopy(row)
                key = f"{row['source_key']}#clip{i:03d}"
                child.update(id=make_id(row["source"], key, {"parent": row["id"], "start": start, "end": end}),
                             source_key=key, parent_id=row["id"], media=[self._probed(path, m)],
                             text_tokens=None, visual_tokens=None, tokens=None)
                meta = json.loads(row["meta"]) if row.get("meta") else {}
                meta["clip"] = {"parent": row["id"], "start": round(start, 3), "end": round(end, 3)}
                child["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
                children.append(child)
        drop(row, self.name, "split_into_clips", f"{len(children)} clips at shot boundaries")
        return [row] + children

    def _probed(self, path: str, like: dict) -> dict:
        from curation.video import probe_video

        info = probe_video(path, self.timeout_s)
        with open(path, "rb") as f:
            data = f.read()
        m = {k: None for k in like}
        m.update(kind="video", uri=path, length=len(data), sha256=hashlib.sha256(data).hexdigest(),
                 format=info.get("format"), width=info["width"], height=info["height"],
                 duration=info["duration"], fps=info.get("fps"), frames=info.get("frames"), codec=info.get("codec"))
        return m
