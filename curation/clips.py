"""The `clips` step: cut videos at shot boundaries (at most `max_clip_s` long) and/or
transcode them to a normalised H.264 MP4. A `conversation` sample is never cut: the times in
its turns (a builder's temporal grounding, video QA) refer to the whole video.

A video that becomes several clips leaves the pipeline as `split_into_clips` and each clip
enters as a new sample whose `parent_id` names it, so the ledger still accounts for
everything: inputs + derived = kept + dropped. Clip files are written under the run's
`_work/media/` folder (a filesystem every executor can write, like the shards'), by their
canonical path and under a name made from the row id only, never from anything in the media.
The source video is opened once through `containment.open_regular` and ffmpeg reads that file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
from typing import Any

from reelforge.curation.errors import ProbeError
from reelforge.curation.media_io import MediaReadError, media_path, open_media, stream_media_fd, video_source
from reelforge.curation.schema import drop, make_id
from reelforge.curation.step import RowStep, register_step

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{2,64}")  # a row id usable as a file name as it is


@register_step("clips")
class VideoClips(RowStep):
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
        self.workdir: str | None = None  # setup() takes the run's work folder from its context

    def process(self, batch: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in batch:
            media = row.get("media") or []
            if row.get("drop_step") is not None or len(media) != 1 or media[0]["kind"] != "video" \
                    or row.get("kind") == "conversation":  # its turns' times refer to the whole video
                out.append(row)
                continue
            try:
                out.extend(self._clip(row))
            except (ProbeError, MediaReadError) as e:
                out.append(drop(row, self.name, e.reason, e.detail))
            except Exception as e:  # noqa: BLE001 - one bad video never fails the job
                out.append(drop(row, self.name, "error", f"{type(e).__name__}: {e}"[:500]))
        return out

    def _media_dir(self, row_id: str) -> tuple[str, str]:
        """(the run's media folder, canonical; a file stem for this row that stays inside it)."""
        root = os.path.join(os.path.realpath(self.workdir or tempfile.gettempdir()), "media")
        stem = row_id if _SAFE_ID.fullmatch(row_id or "") else hashlib.sha1(str(row_id).encode()).hexdigest()[:24]
        return root, stem

    def _clip(self, row: dict) -> list[dict]:
        m = row["media"][0]
        root, stem = self._media_dir(row["id"])
        dest = os.path.join(root, stem[:2])
        os.makedirs(dest, exist_ok=True)
        if os.path.realpath(dest) != dest:
            raise MediaReadError("outside_root", f"{dest} is not a plain folder of the run's work folder")
        fd = open_media(m)  # checked once (containment.open_regular); ffmpeg reads this very file
        try:
            src = None if m.get("offset") is not None else video_source(fd, media_path(m["uri"]))
            return self._clip_from(row, m, fd, src, dest, stem)
        finally:
            os.close(fd)

    def _clip_from(self, row: dict, m: dict, fd: int, src: str | int | None, dest: str, stem: str) -> list[dict]:
        from reelforge.curation import video

        with tempfile.TemporaryDirectory() as tmp:
            if src is None:  # inside a tar: ffmpeg needs a seekable file, copied in pieces
                ext = os.path.splitext(m.get("member") or "")[1].lower()
                src = os.path.join(tmp, "in" + (ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ".mp4"))
                with open(src, "xb") as f:
                    stream_media_fd(fd, m, out=f)
            duration = float(m.get("duration") or 0.0)
            cuts = (video.detect_shots(src, threshold=self.scene_threshold, min_shot_s=self.min_clip_s,
                                       timeout_s=self.timeout_s) if self.split else [])
            spans = video.split_shots(duration, cuts, self.max_clip_s) if self.split else [(0.0, duration)]
            if len(spans) <= 1 and self.transcode is None:
                return [row]
            tc = self.transcode or {}
            if len(spans) <= 1:  # one clip: transcode in place, same sample
                path = os.path.join(dest, f"{stem}.mp4")
                video.transcode(src, path, max_side=tc.get("max_side"), fps=tc.get("fps"),
                                crf=tc.get("crf", 23), timeout_s=self.timeout_s)
                row["media"] = [self._probed(path, m)]
                return [row]
            children = []
            for i, (start, end) in enumerate(spans):
                path = os.path.join(dest, f"{stem}_{i:03d}.mp4")
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
        from reelforge.curation.video import probe_video

        fd = open_media({"uri": path})  # our own output, read back through the same checks
        try:
            length, digest = stream_media_fd(fd, {"uri": path})
            info = probe_video(video_source(fd, path), self.timeout_s)
        finally:
            os.close(fd)
        m = {k: None for k in like}
        m.update(kind="video", uri=path, length=length, sha256=digest,
                 format=info.get("format"), width=info["width"], height=info["height"],
                 duration=info["duration"], fps=info.get("fps"), frames=info.get("frames"), codec=info.get("codec"))
        if like.get("plan_processor") == "keye-vl-1.5" and info.get("frames") and info.get("fps"):
            # the parent was planned at probe: plan the new file the same way (the preset's numbers)
            from reelforge.curation.frame_plan import frame_plan, media_fields
            from reelforge.curation.tokens import TokenError

            try:
                m.update(media_fields(frame_plan(path, info=info, timeout_s=self.timeout_s)))
            except TokenError:
                pass
        return m
