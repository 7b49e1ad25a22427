"""Frame-sampling throughput: `curation.video.decode_frames` against PyAV decoding directly.

Makes (or takes, with --videos DIR) a set of 720p and 1080p H.264 videos (lavfi sources with
motion, libx264 veryfast crf 23, encoded once into a temp dir), then samples each video at
2 frames per second of duration, the Qwen-VL way: n = duration * 2 rounded to an even
number, indices = `sample_indices(frames, n)`, full resolution, RGB, and times:

  project     `decode_frames(path, indices)`: ffprobe, then one ffmpeg process whose
              `select` filter keeps exactly those frames, rgb24 through a pipe into numpy;
  pyav        `av.open`, decode the video stream in order, keep the frames whose index is
              wanted (`to_ndarray(format="rgb24")`), stop after the last; PyAV's default
              threading (thread_type SLICE, which H.264 from x264 cannot use: one core);
  pyav_auto   the same with `stream.thread_type = "AUTO"` (frame threads, all cores): the
              fair baseline, and the one the ratio is quoted against.

Each (video, method) is timed `--repeats` times, order rotating per repeat; the median is
kept, and frames/s is the total frames over the summed medians. It also checks that the
project and PyAV return the same frames (mean absolute difference) for one video.

    .venv/bin/python benchmarks/bench_frame_sampling.py [--per-res 4] [--duration 15]
        [--repeats 3] [--videos DIR] [--workdir DIR] [--keep]

Figures only, no assertions. Needs PyAV (`.venv/bin/pip install av`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np  # noqa: E402

from reelforge.curation import video  # noqa: E402
from reelforge.curation.tools import ffmpeg_path  # noqa: E402

# lavfi sources with motion (and one with grain), drawn at the target size
SOURCES = [
    "testsrc2=s={w}x{h}:r=30",
    "gradients=s={w}x{h}:r=30:speed=0.02:c0=0x2050a0:c1=0xe0a040:c2=0x30c060:nb_colors=3",
    "life=s={w}x{h}:r=30:mold=10:ratio=0.3:death_color=#C83232:life_color=#00ff00,gblur=sigma=1",
    "smptehdbars=s={w}x{h}:r=30,noise=alls=8:allf=t,hue=H=0.5*t",
    "cellauto=s={w}x{h}:r=30:rule=110,gblur=sigma=1.5",
]
RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080)}


def make_videos(root: str, per_res: int, duration: float, sources: list[str] = SOURCES) -> list[str]:
    """`per_res` H.264 videos per resolution, cycling through the lavfi `sources` (also used by
    bench_frame_plan.py with its own sources)."""
    paths = []
    for label, (w, h) in RESOLUTIONS.items():
        for i in range(per_res):
            path = os.path.join(root, f"{label}_{i}.mp4")
            src = sources[i % len(sources)].format(w=w, h=h)
            subprocess.run([ffmpeg_path(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", src,
                            "-t", str(duration), "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
                            "-pix_fmt", "yuv420p", path], check=True, timeout=1800)
            paths.append(path)
    return paths


def pyav_frames(path: str, indices: list[int], auto: bool, clamp: bool = False) -> np.ndarray:
    """Frames `indices` decoded in order with PyAV (`auto`: its frame threads); `clamp`: an index
    past the last frame repeats the last one decoded, as the project's `past_end="clamp"` does."""
    import av

    want = set(indices)
    last = max(indices)
    out = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        if auto:
            stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if clamp:
        return np.stack([out.get(i, out[max(out)]) for i in indices])
    return np.stack([out[i] for i in indices])


def indices_for(info: dict) -> list[int]:
    n = max(2, int(round(info["duration"] * 2 / 2)) * 2)  # 2 frames per second, an even count
    return video.sample_indices(info["frames"], n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", help="a folder of videos to use instead of making them")
    ap.add_argument("--per-res", type=int, default=4, help="videos made per resolution (720p, 1080p)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per made video")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true", help="keep the made videos")
    args = ap.parse_args()

    import av

    work = args.workdir or tempfile.mkdtemp(prefix="bench_frames_")
    os.makedirs(work, exist_ok=True)
    try:
        if args.videos:
            paths = sorted(p for p in glob.glob(os.path.join(args.videos, "*"))
                           if os.path.splitext(p)[1].lower() in (".mp4", ".mkv", ".mov", ".webm", ".avi"))
        else:
            t0 = time.perf_counter()
            paths = make_videos(work, args.per_res, args.duration)
            print(f"made {len(paths)} videos in {time.perf_counter() - t0:.1f}s under {work}")
        infos = {p: video.probe_video(p) for p in paths}
        methods = {
            "project": lambda p, idx: video.decode_frames(p, idx),
            "pyav": lambda p, idx: pyav_frames(p, idx, auto=False),
            "pyav_auto": lambda p, idx: pyav_frames(p, idx, auto=True),
        }
        names = list(methods)
        med: dict[str, dict[str, float]] = {m: {} for m in names}
        nframes: dict[str, int] = {}
        for p in paths:
            idx = indices_for(infos[p])
            nframes[p] = len(idx)
            times: dict[str, list[float]] = {m: [] for m in names}
            for r in range(args.repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for m in order:
                    t0 = time.perf_counter()
                    frames = methods[m](p, idx)
                    times[m].append(time.perf_counter() - t0)
                    assert frames.shape[0] == len(idx)
                    del frames
            for m in names:
                med[m][p] = statistics.median(times[m])

        print(f"\nPyAV {av.__version__}, {os.cpu_count()} CPUs, {args.repeats} repeats, medians; "
              "frames sampled at 2 fps of duration, full resolution RGB")
        hdr = f"{'video':<14} {'size':>10} {'dur s':>6} {'frames':>7} {'n':>4} " + " ".join(
            f"{m + ' s':>12}" for m in names)
        print(hdr)
        for p in paths:
            i = infos[p]
            print(f"{os.path.basename(p)[:14]:<14} {i['width']}x{i['height']:<5} {i['duration']:>6.1f} "
                  f"{i['frames']:>7} {nframes[p]:>4} " + " ".join(f"{med[m][p]:>12.3f}" for m in names))
        summary: dict[str, dict[str, float]] = {}
        groups = {"all": paths}
        for label in RESOLUTIONS:
            g = [p for p in paths if infos[p]["height"] == RESOLUTIONS[label][1]]
            if g:
                groups[label] = g
        print(f"\n{'group':<8} {'videos':>6} {'frames':>7} " + " ".join(f"{m + ' f/s':>14}" for m in names)
              + f" {'ratio vs pyav_auto':>19} {'ratio vs pyav':>14}")
        for label, g in groups.items():
            n = sum(nframes[p] for p in g)
            fps = {m: n / sum(med[m][p] for p in g) for m in names}
            summary[label] = {**{f"{m}_fps": round(fps[m], 2) for m in names},
                              "ratio_vs_pyav_auto": round(fps["project"] / fps["pyav_auto"], 3),
                              "ratio_vs_pyav": round(fps["project"] / fps["pyav"], 3), "frames": n, "videos": len(g)}
            print(f"{label:<8} {len(g):>6} {n:>7} " + " ".join(f"{fps[m]:>14.1f}" for m in names)
                  + f" {summary[label]['ratio_vs_pyav_auto']:>19.2f} {summary[label]['ratio_vs_pyav']:>14.2f}")

        check = paths[-1]
        idx = indices_for(infos[check])
        a = video.decode_frames(check, idx).astype(np.int16)
        b = pyav_frames(check, idx, auto=True).astype(np.int16)
        mad = float(np.abs(a - b).mean())
        identical = bool(np.array_equal(a, b))
        print(f"\nsame frames? {os.path.basename(check)}: {len(idx)} frames, mean abs diff project vs PyAV "
              f"= {mad:.4f} (identical: {identical})")
        print(json.dumps({"bench": "frame_sampling", "pyav": av.__version__, "cpus": os.cpu_count(),
                          "repeats": args.repeats, "groups": summary,
                          "check": {"video": os.path.basename(check), "frames": len(idx), "mean_abs_diff": mad,
                                    "identical": identical}}))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
