"""Frame-plan cost: `curation.frame_plan.frame_plan` (what the probe step now runs per video)
against plainly decoding the same 2-fps frames.

Makes 720p and 1080p H.264 videos with ffmpeg (lavfi sources with motion, libx264 veryfast
crf 23; `--duration` s each, default 15), then, per video, with the keye-vl-1.5 plan's frame
indices (float32 `linspace(0, n-1, k).round()`, 2 fps):

  plan        `frame_plan(path, info=probed)`: decode those frames (full size, RGB), resize each
              to the similarity size (torch bilinear, antialiased), OpenCV-style 8-bit HSV, patch
              cosines against the last slow frame, slow/fast sizes and tokens;
  decode      `video.decode_frames(path, indices)`: the project's decoder, the same frames only;
  pyav_auto   PyAV (`stream.thread_type = "AUTO"`), decode in order and keep the wanted frames as
              rgb24: what a user would write.

Each (video, method) is timed `--repeats` times (order rotating), medians kept; frames/s is the
total sampled frames over the summed medians, and the ratios are plan / decode and plan / PyAV
(so 0.8 means the plan runs at 80% of plain decoding's rate: the typing costs 20% on top).

    .venv/bin/python benchmarks/bench_frame_plan.py [--per-res 2] [--duration 15] [--repeats 3]

Figures only, no assertions. PyAV is optional (`.venv/bin/pip install av`; make bench installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from reelforge.curation import video
from reelforge.curation.frame_plan import frame_plan
from reelforge.curation.tokens import VisualTokenConfig, video_nframes

SOURCES = [
    "testsrc2=s={w}x{h}:r=30",
    "smptehdbars=s={w}x{h}:r=30,noise=alls=8:allf=t,hue=H=0.5*t",
    "gradients=s={w}x{h}:r=30:speed=0.02:c0=0x2050a0:c1=0xe0a040:c2=0x30c060:nb_colors=3",
]
RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080)}


def make_videos(root: str, per_res: int, duration: float) -> list[str]:
    """The frame-sampling benchmark's encoder, with this benchmark's sources."""
    from bench_frame_sampling import make_videos as encode

    return encode(root, per_res, duration, SOURCES)


def pyav_frames(path: str, indices: list[int]):
    """The frame-sampling benchmark's PyAV decoder (frame threads on), clamped at the end like the plan."""
    from bench_frame_sampling import pyav_frames as decode

    return decode(path, indices, auto=True, clamp=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-res", type=int, default=2)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        import av

        have_av = av.__version__
    except ImportError:
        have_av = None
    cfg = VisualTokenConfig()
    work = tempfile.mkdtemp(prefix="bench_plan_")
    try:
        t0 = time.perf_counter()
        paths = make_videos(work, args.per_res, args.duration)
        print(f"made {len(paths)} videos in {time.perf_counter() - t0:.1f}s")
        infos = {p: video.probe_video(p) for p in paths}
        idx = {p: video.sample_indices(infos[p]["frames"],
                                       video_nframes(infos[p]["duration"], infos[p]["fps"], cfg,
                                                     total_frames=infos[p]["frames"])) for p in paths}
        methods = {"plan": lambda p: frame_plan(p, cfg, info=infos[p]),
                   "decode": lambda p: video.decode_frames(p, idx[p], past_end="clamp")}
        if have_av:
            methods["pyav_auto"] = lambda p: pyav_frames(p, idx[p])
        names = list(methods)
        med: dict[str, dict[str, float]] = {m: {} for m in names}
        plans = {}
        for p in paths:
            times: dict[str, list[float]] = {m: [] for m in names}
            for r in range(args.repeats):
                for m in names[r % len(names):] + names[:r % len(names)]:
                    t = time.perf_counter()
                    res = methods[m](p)
                    times[m].append(time.perf_counter() - t)
                    if m == "plan":
                        plans[p] = res
                    del res
            for m in names:
                med[m][p] = statistics.median(times[m])
        print(f"\n{os.cpu_count()} CPUs, PyAV {have_av}, {args.repeats} repeats, medians; keye-vl-1.5 plan frames "
              "(2 fps), full-size RGB")
        print(f"{'video':<10} {'frames':>6} {'slow':>5} {'tokens':>7} " + " ".join(f"{m + ' s':>12}" for m in names))
        for p in paths:
            pl = plans[p]
            print(f"{os.path.basename(p):<10} {pl['frames']:>6} {pl['slow_frames']:>5} {pl['tokens']:>7} "
                  + " ".join(f"{med[m][p]:>12.3f}" for m in names))
        summary = {}
        print(f"\n{'group':<6} {'frames':>6} " + " ".join(f"{m + ' f/s':>14}" for m in names)
              + f" {'plan/decode':>12}" + (f" {'plan/pyav':>10}" if have_av else ""))
        for label, (_, h) in RESOLUTIONS.items():
            g = [p for p in paths if infos[p]["height"] == h]
            n = sum(len(idx[p]) for p in g)
            fps = {m: n / sum(med[m][p] for p in g) for m in names}
            row = {**{f"{m}_fps": round(fps[m], 1) for m in names}, "frames": n,
                   "plan_vs_decode": round(fps["plan"] / fps["decode"], 3)}
            if have_av:
                row["plan_vs_pyav_auto"] = round(fps["plan"] / fps["pyav_auto"], 3)
            summary[label] = row
            print(f"{label:<6} {n:>6} " + " ".join(f"{fps[m]:>14.1f}" for m in names)
                  + f" {row['plan_vs_decode']:>12.2f}" + (f" {row['plan_vs_pyav_auto']:>10.2f}" if have_av else ""))
        print(json.dumps({"bench": "frame_plan", "cpus": os.cpu_count(), "pyav": have_av, "repeats": args.repeats,
                          "duration_s": args.duration, "groups": summary}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
