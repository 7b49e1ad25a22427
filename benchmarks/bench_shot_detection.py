"""Shot-boundary detection: `curation.video.detect_shots` against PySceneDetect.

Assembles N videos with known cuts: each is 4-7 clips of 1.5-4 s drawn from visually
different lavfi sources, several with motion, grain or camera-like pans, joined with
ffmpeg's concat filter (hard cuts) and encoded with libx264. With --flashes, every video
also gets one 2-frame white flash inside a shot (a flash is not a cut). Then it runs

  project          `detect_shots(path)`: content score on 64x64 thumbnails vs neighbours (default);
  project_ffmpeg   `detect_shots(path, method="ffmpeg")`: ffmpeg's own `scene` score > 0.3;
  psd_content      PySceneDetect `detect(path, ContentDetector())` (defaults: threshold 27,
                   min_scene_len 15 frames, OpenCV backend);
  psd_adaptive     PySceneDetect `detect(path, AdaptiveDetector())` (defaults),

and prints precision, recall and F1 of the cut times (a detected cut matches one true cut
within --tol seconds, one to one) and the seconds per video (median of --repeats).

    .venv/bin/python benchmarks/bench_shot_detection.py [--videos 8] [--size 640x360]
        [--fps 30] [--flashes] [--tol 0.5] [--repeats 1] [--seed 0] [--workdir DIR] [--keep]

Figures only, no assertions. Needs PySceneDetect and OpenCV
(`.venv/bin/pip install scenedetect opencv-python-headless`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time

from reelforge.curation import video  # noqa: E402
from reelforge.curation.tools import ffmpeg_path  # noqa: E402

SOURCES = {
    "testsrc2": "testsrc2=s={s}:r={r}",
    "smptebars": "smptebars=s={s}:r={r}",
    "mandelbrot": "mandelbrot=s={s}:r={r}:maxiter=500",
    "rednoise": "color=c=red:s={s}:r={r},noise=alls=40:allf=t",
    "bluenoise": "color=c=0x2040a0:s={s}:r={r},noise=alls=30:allf=t",
    "rgbtestsrc": "rgbtestsrc=s={s}:r={r}",
    "life": "life=s={s}:r={r}:mold=10:ratio=0.1:death_color=#C83232:life_color=#00ff00",
    "cellauto": "cellauto=s={s}:r={r}:rule=110",
    "sierpinski": "sierpinski=s={s}:r={r}",
    "gradients": "gradients=s={s}:r={r}:speed=0.05",
    # a camera-like pan across a still picture, and a grainy bar chart with a hue drift
    "pan": "testsrc=s=1280x720:r={r},trim=end_frame=1,loop=loop=-1:size=1,"
           "crop=w={w}:h={h}:x='min(t*150\\,1280-{w})':y='(720-{h})/2',noise=alls=6:allf=t",
    "grainbars": "smptehdbars=s={s}:r={r},noise=alls=12:allf=t,hue=H=0.6*t",
}


def make_video(path: str, clips: list[tuple[str, float]], size: str, rate: int,
               flash_at: float | None) -> list[float]:
    w, h = size.split("x")
    parts, labels = [], []
    for i, (name, d) in enumerate(clips):
        parts.append(SOURCES[name].format(s=size, r=rate, w=w, h=h)
                     + f",trim=duration={d},setpts=PTS-STARTPTS,format=yuv420p,setsar=1[c{i}]")
        labels.append(f"[c{i}]")
    graph = ";".join(parts) + ";" + "".join(labels) + f"concat=n={len(clips)}:v=1:a=0"
    if flash_at is not None:
        n0 = round(flash_at * rate)
        graph += f",drawbox=x=0:y=0:w=iw:h=ih:c=white:t=fill:enable='between(n,{n0},{n0 + 1})'"
    graph += "[out]"
    subprocess.run([ffmpeg_path(), "-nostdin", "-loglevel", "error", "-y", "-filter_complex", graph,
                    "-map", "[out]", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                    path], check=True, timeout=1800)
    cuts, t = [], 0.0
    for _, d in clips[:-1]:
        t += d
        cuts.append(t)
    return cuts


def psd(path: str, adaptive: bool) -> list[float]:
    from scenedetect import AdaptiveDetector, ContentDetector, detect

    scenes = detect(path, AdaptiveDetector() if adaptive else ContentDetector(), show_progress=False)
    return [float(getattr(s[0], "seconds", None) or s[0].get_seconds()) for s in scenes[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--flashes", action="store_true", help="one 2-frame white flash inside a shot per video")
    ap.add_argument("--tol", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import scenedetect

    work = args.workdir or tempfile.mkdtemp(prefix="bench_shots_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    names = list(SOURCES)
    try:
        t0 = time.perf_counter()
        videos = []
        for v in range(args.videos):
            clips: list[tuple[str, float]] = []
            for _ in range(rng.randint(4, 7)):
                name = rng.choice([x for x in names if not clips or x != clips[-1][0]])
                clips.append((name, round(rng.uniform(1.5, 4.0) * args.fps) / args.fps))
            flash_at = None
            if args.flashes:  # inside the longest clip, at least 0.6 s from its cuts
                k = max(range(len(clips)), key=lambda i: clips[i][1])
                start = sum(d for _, d in clips[:k])
                flash_at = start + rng.uniform(0.6, clips[k][1] - 0.6)
            path = os.path.join(work, f"shots_{v}.mp4")
            videos.append((path, make_video(path, clips, args.size, args.fps, flash_at), clips))
        print(f"made {len(videos)} videos ({args.size}, {args.fps} fps) in {time.perf_counter() - t0:.1f}s "
              f"under {work}")

        methods = {
            "project": lambda p: video.detect_shots(p),
            "project_ffmpeg": lambda p: video.detect_shots(p, method="ffmpeg"),
            "psd_content": lambda p: psd(p, adaptive=False),
            "psd_adaptive": lambda p: psd(p, adaptive=True),
        }
        stats = {m: {"tp": 0, "det": 0, "true": 0, "secs": []} for m in methods}
        total_s = 0.0
        for path, true, clips in videos:
            total_s += sum(d for _, d in clips)
            for r in range(args.repeats):
                order = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
                times = {}
                for m in order:
                    t = time.perf_counter()
                    cuts = methods[m](path)
                    times[m] = time.perf_counter() - t
                    if r == 0:
                        stats[m]["tp"] += video.match_cuts(cuts, true, args.tol)
                        stats[m]["det"] += len(cuts)
                        stats[m]["true"] += len(true)
                for m in methods:
                    stats[m].setdefault("_t", {}).setdefault(path, []).append(times[m])
        print(f"\nPySceneDetect {scenedetect.__version__}, {os.cpu_count()} CPUs, {len(videos)} videos, "
              f"{sum(len(t) for _, t, _ in videos)} true cuts, {total_s:.0f} s of video"
              f"{', one flash per video' if args.flashes else ''}; match within {args.tol} s")
        print(f"{'method':<16} {'precision':>9} {'recall':>7} {'F1':>6} {'s/video':>8} {'x realtime':>10}")
        summary = {}
        for m, st in stats.items():
            p = st["tp"] / max(st["det"], 1)
            rcl = st["tp"] / max(st["true"], 1)
            f1 = 2 * p * rcl / max(p + rcl, 1e-9)
            secs = sum(statistics.median(ts) for ts in st["_t"].values())
            summary[m] = {"precision": round(p, 4), "recall": round(rcl, 4), "f1": round(f1, 4),
                          "s_per_video": round(secs / len(videos), 4), "x_realtime": round(total_s / secs, 1),
                          "tp": st["tp"], "detected": st["det"], "true": st["true"]}
            print(f"{m:<16} {p:>9.3f} {rcl:>7.3f} {f1:>6.3f} {secs / len(videos):>8.3f} {total_s / secs:>10.1f}")
        print(json.dumps({"bench": "shot_detection", "scenedetect": scenedetect.__version__, "videos": len(videos),
                          "size": args.size, "fps": args.fps, "flashes": args.flashes, "tol_s": args.tol,
                          "seed": args.seed, "methods": summary}))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
