"""3D multimodal rotary position ids (M-RoPE) for the LLM: Keye-VL's layout, per packed sample.

Keye-VL 1.0 uses Qwen2.5-VL's scheme with temporal patch 1, `tokens_per_second` 2 and
`second_per_grid_ts = 1 / fps` (one grid step per sampled frame). Each position id has three rows
(temporal, height, width):

- text tokens: the three rows are equal and count up by one;
- an image or video starting at position `s`, with a grid of t x h x w patches (h, w before the
  2x2 merge, so h/2 x w/2 tokens per frame, frame-major, row-major): token (k, i, j) gets
  temporal `s + floor(k * tokens_per_second * second_per_grid_t)` (images: `s + k`),
  height `s + i`, width `s + j`;
- the text after it starts at `s + max(h, w) / 2`. This is the rule of the installed transformers'
  `Qwen2_5_VLModel.get_rope_index` (5.x), the test's oracle; older releases (and the original
  Qwen2.5-VL code) started it at the block's largest position + 1, which differs for videos whose
  temporal positions outrun their height and width.

The temporal step is computed in float32 and truncated, as transformers does:
`(arange(t) * float32(tokens_per_second * second_per_grid_t)).long()`.

**Keye-VL 1.5 videos.** The released 1.5 processor lays a video out frame by frame inside its
`<|vision_start|>` ... `<|vision_end|>`: `<|frame|>`, the frame's timestamp as text, then the
frame's pads (a fast frame's between `<|fast_start|>` and `<|fast_end|>`; see
`training.loader.FrameLayout`). The released model positions every frame's pad run as its own
grid (1, h_k, w_k): a one-frame video at temporal offset 0, so frame k's tokens get temporal
`s_k`, height `s_k + i`, width `s_k + j` from the position `s_k` where its run starts; the text
between frames (frame token, timestamp digits, fast start/end) counts up by one from
`s_k + max(h_k, w_k) / 2` as any text does. Time enters only through the timestamp text, and
slow and fast frames differ only in their own h_k, w_k. This is vLLM's `keye_vl1_5.py`
`get_mrope_input_positions` (it splits `video_grid_thw` into per-frame [1, h, w] rows), and what
transformers' `get_rope_index` gives for those per-frame grids (tests/test_loader_plan.py checks
the loader against it); the loader passes each such run as a one-frame `video_frames` entry.

`video_frames` also takes several frames per run, (h_k, w_k, time_k) each, all from the run's
start `s`: frame k's tokens get temporal `s + floor(tokens_per_second * (time_k - time_0))`
(float32) and the text after the run starts at `s + max over frames of max(h_k, w_k) / 2`. With
equal sizes and `time_k = k / fps` this is exactly the 1.0 rule (tokens_per_second 2 is a power
of two, so the float32 products round the same way): the loader passes 1.0 videos this way.

Packed sequences: positions restart at 0 for every sample (`segment_ids`, one id per token, -1
for padding). Padding gets 0, 1, 2, ... from where it starts, on all three rows, as the 1D loader
does. A vision block never crosses a sample boundary.
"""

from __future__ import annotations

from typing import Sequence

import torch

TOKENS_PER_SECOND = 2
SPATIAL_MERGE = 2


def _frame_block(start: int, t_pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Positions of frames at temporal offsets `t_pos` (t,), each h x w tokens: (3, t*h*w)."""
    hh = torch.arange(h) + start
    ww = torch.arange(w) + start
    T, H, W = torch.meshgrid(t_pos + start, hh, ww, indexing="ij")
    return torch.stack([T, H, W]).reshape(3, -1)


def rope_index(input_ids: torch.Tensor | Sequence[int], image_grid_thw=None, video_grid_thw=None,
               second_per_grid_ts=None, *, image_token_id: int, video_token_id: int,
               video_frames: Sequence[Sequence[tuple[int, int, float]]] | None = None,
               segment_ids: torch.Tensor | Sequence[int] | None = None,
               tokens_per_second: float = TOKENS_PER_SECOND, spatial_merge_size: int = SPATIAL_MERGE
               ) -> torch.Tensor:
    """3D position ids (3, L) of one row of token ids (see the module docstring for the rule).

    image_grid_thw / video_grid_thw: (n, 3) patch grids (before the merge) of the images and
    videos in order of appearance across the whole row; second_per_grid_ts: (n_videos,) seconds
    per temporal grid step, 1/fps for Keye-VL 1.0 (default 1.0 each, like transformers).
    video_frames: instead of video_grid_thw, each run of video pads as a list of (h, w, time_seconds)
    frames in patches before the merge (a 1.0 video at k / fps; one frame of a 1.5 video alone).
    A run of image (video) pad tokens takes as many tokens as its grid has, so adjacent media
    without text between them also work.
    """
    ids = torch.as_tensor(input_ids).flatten().tolist()
    L = len(ids)
    seg = torch.as_tensor(segment_ids).flatten().tolist() if segment_ids is not None else [0] * L
    if len(seg) != L:
        raise ValueError(f"{L} tokens but {len(seg)} segment ids")
    m = spatial_merge_size
    images = [tuple(int(x) for x in g) for g in (image_grid_thw if image_grid_thw is not None else [])]
    if video_frames is not None:
        if video_grid_thw is not None:
            raise ValueError("give video_grid_thw or video_frames, not both")
        videos: list = [[(int(h), int(w), float(t)) for h, w, t in v] for v in video_frames]
    else:
        grids = [tuple(int(x) for x in g) for g in (video_grid_thw if video_grid_thw is not None else [])]
        if second_per_grid_ts is None:
            spg = torch.ones(len(grids), dtype=torch.float32)
        else:
            spg = torch.as_tensor(second_per_grid_ts).flatten()
            if not spg.is_floating_point():
                spg = spg.float()
        if len(spg) < len(grids):
            raise ValueError(f"{len(grids)} videos but {len(spg)} second_per_grid_ts")
        videos = [(g, spg[i]) for i, g in enumerate(grids)]
    ii = vi = 0
    out = torch.zeros(3, L, dtype=torch.long)
    pos = 0
    p = 0
    while p < L:
        if p > 0 and seg[p] != seg[p - 1]:
            pos = 0
        tok = ids[p]
        if seg[p] < 0 or tok not in (image_token_id, video_token_id):
            out[:, p] = pos
            pos += 1
            p += 1
            continue
        if tok == image_token_id:
            if ii >= len(images):
                raise ValueError(f"more image blocks than the {len(images)} image grids")
            t, h, w = images[ii]
            ii += 1
            block = _frame_block(pos, torch.arange(t), h // m, w // m)
            nxt = pos + max(h, w) // m
        else:
            if vi >= len(videos):
                raise ValueError(f"more video blocks than the {len(videos)} videos")
            v = videos[vi]
            vi += 1
            if video_frames is not None:
                t0 = torch.tensor(v[0][2], dtype=torch.float32)
                parts = []
                for h, w, ts in v:
                    tp = ((torch.tensor(ts, dtype=torch.float32) - t0) * tokens_per_second).long().view(1)
                    parts.append(_frame_block(pos, tp, h // m, w // m))
                block = torch.cat(parts, 1)
                nxt = pos + max(max(h, w) for h, w, _ in v) // m
            else:
                (t, h, w), s = v
                interval = tokens_per_second * s
                block = _frame_block(pos, (torch.arange(t) * interval).long(), h // m, w // m)
                nxt = pos + max(h, w) // m
        n = block.shape[1]
        run = ids[p:p + n]
        if len(run) != n or any(x != tok for x in run) or any(s != seg[p] for s in seg[p:p + n]):
            raise ValueError(f"a vision block of {n} tokens at {p} does not match the pad tokens of one sample")
        out[:, p:p + n] = block
        pos = nxt
        p += n
    if ii != len(images) or vi != len(videos):
        raise ValueError(f"{len(images)} image and {len(videos)} video grids but {ii} and {vi} blocks")
    return out
