"""A small, real, deterministic corpus for `reelforge demo` and the tests.

Why real: the pipeline's value is in what it does with actual bytes (JPEG decoding, H.264
probing, tar byte ranges), so the demo feeds it PIL-drawn images and ffmpeg-encoded
videos in every source format the readers know, not mocks. Why deterministic: tests and
the demo compare shard hashes across runs, so the same seed writes the same bytes (fixed
drawing from seeded RNGs, fixed tar headers, bit-exact single-threaded x264).

Planted exact duplicates and planted broken inputs are listed in `planted.json` with the
`source` and `source_key` the readers give them and the ledger reason they should end with,
so a run can be checked against what was put in.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw, ImageFont

from reelforge.curation.tools import ffmpeg_path

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "grey": (128, 128, 128), "pink": (240, 150, 190), "brown": (120, 75, 35), "teal": (30, 150, 150)}
SHAPES = ("circle", "square", "triangle", "line", "ring", "rectangle")
LABEL_WORDS = ("river", "city", "night", "light", "garden", "window", "music", "market", "train", "bridge",
               "ocean", "forest", "stone", "cloud", "summer", "winter", "table", "paper", "tower", "road")

# word lists for the text documents
ADJ = ("quiet", "busy", "narrow", "wide", "old", "new", "bright", "dark", "small", "large", "wooden",
       "stone", "distant", "crowded", "empty", "green", "cold", "warm", "broken", "famous", "hidden",
       "tall", "low", "muddy", "silver", "forgotten", "careful", "sudden", "gentle", "noisy")
NOUN = ("river", "city", "bridge", "market", "train", "garden", "window", "forest", "field", "harbour",
        "village", "tower", "road", "library", "kitchen", "station", "mountain", "lake", "school", "factory",
        "island", "theatre", "museum", "farm", "lighthouse", "bakery", "orchard", "valley", "canal", "square")
VERB = ("crossed", "followed", "watched", "opened", "painted", "remembered", "built", "visited", "passed",
        "repaired", "described", "measured", "photographed", "cleaned", "sold", "bought", "mapped", "guarded")
NAMES = ("Ada", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jana", "Kofi", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sami", "Tove")
TIMES = ("In the morning", "Every winter", "Later that night", "On Sundays", "Years ago", "Before dawn",
         "After the storm", "Each spring", "By noon", "At the end of the summer")
PREPS = ("near", "behind", "along", "beside", "beyond", "under", "across", "above")

TAR_NAMES = tuple(f"part-{t:05d}.tar" for t in range(3))
# (width, height) of the videos; one portrait
VIDEO_SIZES = ((320, 240), (256, 144), (480, 270), (240, 320), (320, 180))
VIDEO_FPS = (24, 25, 30)
FFMPEG_TIMEOUT_S = 120


@dataclass
class Drawn:
    """One drawn image: its encoded bytes and the facts its captions and questions use."""

    data: bytes
    ext: str
    caption: str
    width: int
    height: int
    background: str
    shapes: list[tuple[str, str]]
    word: Optional[str] = None


@dataclass
class VideoSpec:
    """What one demo clip is; the tests use it to check what ffprobe finds."""

    name: str  # file name inside videos/
    pattern: str
    width: int
    height: int
    fps: int
    frames: int
    graph: str  # the lavfi filtergraph ffmpeg reads
    caption: str
    tags: list[str] = field(default_factory=list)
    json_sidecar: bool = False

    @property
    def duration(self) -> float:
        return self.frames / self.fps


# --- images ---------------------------------------------------------------------------------

def _draw(rng: random.Random, w: int, h: int) -> tuple[Image.Image, dict[str, Any]]:
    """Draw 1-3 shapes (and sometimes a word) on a plain background; return the facts drawn."""
    bg_name = rng.choice(sorted(COLORS))
    img = Image.new("RGB", (w, h), COLORS[bg_name])
    d = ImageDraw.Draw(img)
    others = [c for c in sorted(COLORS) if c != bg_name]
    shapes: list[tuple[str, str]] = []
    side = min(w, h)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(others)
        col = COLORS[name]
        shape = rng.choice(SHAPES)
        s = rng.randint(max(4, side // 6), max(5, side // 2))
        x0, y0 = rng.randint(0, max(0, w - s)), rng.randint(0, max(0, h - s))
        if shape == "circle":
            d.ellipse([x0, y0, x0 + s, y0 + s], fill=col)
        elif shape == "ring":
            d.ellipse([x0, y0, x0 + s, y0 + s], outline=col, width=max(2, s // 8))
        elif shape == "square":
            d.rectangle([x0, y0, x0 + s, y0 + s], fill=col)
        elif shape == "rectangle":
            d.rectangle([x0, y0, min(w, x0 + 2 * s), y0 + max(2, s // 2)], fill=col)
        elif shape == "triangle":
            d.polygon([(x0, y0 + s), (x0 + s // 2, y0), (x0 + s, y0 + s)], fill=col)
        else:
            d.line([x0, y0, x0 + s, y0 + rng.randint(0, s)], fill=col, width=max(2, s // 12))
        shapes.append((name, shape))
    word = None
    if side >= 96 and rng.random() < 0.3:
        word = rng.choice(LABEL_WORDS)
        word_col = rng.choice(others)
        try:
            font = ImageFont.load_default(size=max(10, side // 8))
        except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
            font = ImageFont.load_default()
        d.text((rng.randint(0, max(0, w // 2)), rng.randint(0, max(0, h - side // 6))), word,
               fill=COLORS[word_col], font=font)
        return img, {"background": bg_name, "shapes": shapes, "word": word, "word_colour": word_col}
    return img, {"background": bg_name, "shapes": shapes, "word": None, "word_colour": None}


def _encode(img: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    opts: dict[str, Any] = {"JPEG": {"quality": 90}, "WEBP": {"quality": 80, "method": 4}, "PNG": {}}[fmt]
    img.save(b, fmt, **opts)
    return b.getvalue()


def _make_images(n: int, rng: random.Random) -> list[Drawn]:
    """Varied sizes (64..640 a side, some 4:1 or 1:4), mostly JPEG with some PNG and WEBP."""
    out = []
    for i in range(n):
        w, h = rng.randint(64, 640), rng.randint(64, 640)
        if i % 23 == 7:
            w, h = 512, 128  # 4:1 panorama
        elif i % 23 == 15:
            w, h = 120, 480  # 1:4 tall strip
        img, facts = _draw(rng, w, h)
        fmt = "PNG" if i % 17 == 3 else "WEBP" if i % 19 == 5 else "JPEG"
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        out.append(Drawn(_encode(img, fmt), ext, _caption_of(facts), w, h, facts["background"],
                         facts["shapes"], facts["word"]))
    return out


def _a(word: str) -> str:
    """'a red circle', 'an orange square'."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _caption_of(facts: dict[str, Any]) -> str:
    cap = " and ".join(f"{_a(c)} {s}" for c, s in facts["shapes"]) + f" on {_a(facts['background'])} background"
    if facts["word"]:
        cap += f', with the word "{facts["word"]}" written in {facts["word_colour"]}'
    return cap


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed header fields so the tar bytes depend on content only."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


# --- text -----------------------------------------------------------------------------------

def _plural(noun: str) -> str:
    return noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"


def _sentence(rng: random.Random) -> str:
    a, n, v = lambda: rng.choice(ADJ), lambda: rng.choice(NOUN), lambda: rng.choice(VERB)
    t = rng.randrange(7)
    if t == 0:
        return f"{rng.choice(TIMES)}, {rng.choice(NAMES)} {v()} the {a()} {n()} {rng.choice(PREPS)} the {n()}."
    if t == 1:
        return f"The {n()} {rng.choice(PREPS)} the {n()} was {a()} and {a()}."
    if t == 2:
        return f"{rng.choice(NAMES)} said that the {n()} had always been {a()}."
    if t == 3:
        return f"Nobody {v()} the {a()} {n()} until the {n()} was {a()} again."
    if t == 4:
        return (f"There were {rng.randint(2, 40)} {_plural(n())} {rng.choice(PREPS)} the {n()}, "
                f"each more {a()} than the last.")
    if t == 5:
        return f"{rng.choice(NAMES)} and {rng.choice(NAMES)} {v()} {_a(a())} {n()} together."
    return f"It is said that the {a()} {n()} {v()} the {n()} only once."


def _doc(rng: random.Random) -> str:
    paras = [" ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        paras.insert(0, f"The {rng.choice(ADJ).capitalize()} {rng.choice(NOUN).capitalize()}")
    return "\n\n".join(paras)


def _whitespace_case_variant(doc: str) -> str:
    """Same text after lower-casing and collapsing whitespace, different bytes."""
    return "  " + doc.upper().replace(" ", "   ").replace("\n\n", " \n\t\n ") + "\n"


# --- videos ---------------------------------------------------------------------------------

def _hex(name: str) -> str:
    r, g, b = COLORS[name]
    return f"0x{r:02x}{g:02x}{b:02x}"


def _pattern(p: str, v: int, w: int, h: int, fps: int, rng: random.Random) -> tuple[str, str, list[str]]:
    """(lavfi graph, what it shows, tags) for one pattern; sources with randomness get a fixed seed."""
    s = f"s={w}x{h}:r={fps}"
    if p == "testsrc2":
        return f"testsrc2={s}", "the testsrc2 colour test pattern with a moving gradient and a frame counter", \
            ["test pattern", "counter"]
    if p == "smptebars":
        return f"smptebars={s}", "SMPTE colour bars, a static broadcast test card", ["test card", "static"]
    if p == "mandelbrot":
        return f"mandelbrot={s}", "a slow zoom into the Mandelbrot set with bright fractal edges", ["fractal", "zoom"]
    if p == "moving_box":
        bg, fg = rng.sample(sorted(COLORS), 2)
        box = max(16, min(w, h) // 6)
        return (f"color=c={_hex(bg)}:{s}[bg];color=c={_hex(fg)}:s={box}x{box}:r={fps}[fg];"
                f"[bg][fg]overlay=x=mod(t*{w // 3}\\,W-w):y=H/2-h/2+H/4*sin(t*3)[out0]"), \
            f"{_a(fg)} square sliding left to right and bobbing up and down on {_a(bg)} background", \
            ["motion", fg, bg]
    if p == "falling_bar":
        bg, fg = rng.sample(sorted(COLORS), 2)
        return (f"color=c={_hex(bg)}:{s}[bg];color=c={_hex(fg)}:s={w}x{max(8, h // 10)}:r={fps}[fg];"
                f"[bg][fg]overlay=x=0:y=mod(t*{h // 2}\\,H-h)[out0]"), \
            f"{_a(fg)} horizontal bar falling from top to bottom over {_a(bg)} background", ["motion", fg, bg]
    if p == "plasma":
        # (ffmpeg's own `gradients` source ignores its seed in 5.x, so its bytes change per run)
        k = 20 + v % 7
        return (f"nullsrc={s},format=gbrp,geq=r='128+127*sin(X/{k}+T*2)':g='128+127*sin(Y/{k + 9}+T*3)'"
                f":b='128+127*sin((X+Y)/{k + 17}-T)'"), "soft colour waves rippling across the frame", \
            ["plasma", "abstract"]
    if p == "life":
        return (f"life={s}:seed={2000 + v}:ratio=0.2:life_color=0x33dd55:death_color=0x101010"), \
            "Conway's Game of Life, green cells being born and dying on a dark background", \
            ["cellular automaton", "abstract"]
    if p == "cellauto":
        return f"cellauto={s}:seed={3000 + v}:rule=110", \
            "a rule 110 cellular automaton scrolling up the frame in black and white", \
            ["cellular automaton", "black and white"]
    if p == "rgbtestsrc":
        return f"rgbtestsrc={s}", "the red, green and blue gradient bands of an RGB test pattern", \
            ["test pattern", "static"]
    if p == "hue_bars":
        return f"smptehdbars={s},hue=h=t*90", "HD colour bars slowly cycling through every hue", \
            ["test card", "colour cycle"]
    raise ValueError(p)


PATTERNS = ("testsrc2", "moving_box", "smptebars", "mandelbrot", "plasma", "falling_bar", "life",
            "cellauto", "rgbtestsrc", "hue_bars")


def video_plan(n_videos: int, seed: int = 0) -> list[VideoSpec]:
    """The clips make_demo_corpus encodes, from their own RNG so n_images does not change them."""
    rng = random.Random(f"reelforge-demo-videos-{seed}")
    specs: list[VideoSpec] = []
    seen: set[tuple] = set()
    for v in range(n_videos):
        p = PATTERNS[v % len(PATTERNS)]
        w, h = VIDEO_SIZES[(v + v // len(PATTERNS)) % len(VIDEO_SIZES)]
        if p in ("mandelbrot", "life", "plasma") and w * h > 320 * 240:
            w, h = 320, 180  # the costly sources stay small
        fps = rng.choice(VIDEO_FPS)
        graph, what, tags = _pattern(p, v, w, h, fps, rng)
        while True:  # whole-frame durations from 1 to 6 s, never two identical clips
            frames = rng.randint(fps, 6 * fps)
            if (graph, frames) not in seen:
                seen.add((graph, frames))
                break
        secs = frames / fps
        caption = f"A {secs:.1f} second clip of {what}, {w}x{h} at {fps} frames per second."
        specs.append(VideoSpec(f"clip{v:03d}.mp4", p, w, h, fps, frames, graph, caption,
                               tags + ["synthetic"], json_sidecar=v % 3 == 2))
    return specs


def _encode_video(path: str, spec: VideoSpec) -> None:
    """H.264 in MP4, bit-exact: single-threaded x264, no encoder string, no metadata."""
    cmd = [ffmpeg_path(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", spec.graph,
           "-frames:v", str(spec.frames), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "28",
           "-threads", "1", "-pix_fmt", "yuv420p", "-fflags", "+bitexact", "-flags:v", "+bitexact",
           "-map_metadata", "-1", path]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"ffmpeg failed on {spec.name} ({spec.graph}): {res.stderr.strip()[-500:]}")


# --- the corpus ------------------------------------------------------------------------------

OWNED = ("tars", "images", "videos", "captions.jsonl", "text.jsonl", "conversations.jsonl",
         "interleaved.jsonl", "preferences.parquet", "planted.json", "recipe.yaml")


def _prepare_root(root: str) -> None:
    """Remove a previous demo corpus, but never a folder that is not one."""
    if os.path.isdir(root) and os.listdir(root):
        if not os.path.exists(os.path.join(root, "planted.json")):
            raise ValueError(f"{root} is not empty and holds no demo corpus (no planted.json): "
                             "pass an empty or new folder.")
        for name in OWNED:
            p = os.path.join(root, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    for sub in ("tars", "images", "videos"):
        os.makedirs(os.path.join(root, sub))


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def make_demo_corpus(root: str, n_images: int = 300, n_videos: int = 24, seed: int = 0,
                     log: Callable[..., None] = print) -> str:
    """Write the corpus under `root` and return the path of its recipe (`root/recipe.yaml`).

    Same seed and sizes, same bytes. A folder that already holds a demo corpus is rewritten.
    """
    if n_images < 12 or n_videos < 2:
        raise ValueError("the demo corpus needs n_images >= 12 and n_videos >= 2 to plant its duplicates")
    t0 = time.monotonic()
    root = os.path.abspath(root)
    _prepare_root(root)
    rng = random.Random(f"reelforge-demo-{seed}")
    planted: dict[str, Any] = {}
    dup_pairs: list[dict[str, str]] = []

    # 1. images: 2/3 in img2dataset-style tars, 1/3 as files named by a JSONL manifest
    images = _make_images(n_images, rng)
    n_tar = n_images * 2 // 3
    per_tar = (n_tar + 2) // 3
    tar_of = [min(i // per_tar, 2) for i in range(n_tar)]
    tars = [tarfile.open(os.path.join(root, "tars", n), "w", format=tarfile.USTAR_FORMAT) for n in TAR_NAMES]
    try:
        for i in range(n_tar):
            im, key = images[i], f"{i:06d}"
            tf = tars[tar_of[i]]
            _tar_add(tf, f"{key}.{im.ext}", im.data)
            _tar_add(tf, f"{key}.txt", im.caption.encode())
            _tar_add(tf, f"{key}.json", _dumps({"url": f"https://images.example.invalid/{key}.{im.ext}",
                                                "caption": im.caption, "width": im.width,
                                                "height": im.height}).encode())
            if i == per_tar // 2 and tar_of[i] == 0:
                # planted: a 2x2 JPEG, decodable but below the recipe's min_side
                _tar_add(tf, "tiny-0001.jpg", _encode(Image.new("RGB", (2, 2), (200, 30, 30)), "JPEG"))
                _tar_add(tf, "tiny-0001.txt", b"a red dot of two by two pixels")
                planted["tiny_image"] = {"source": "captions_wds", "source_key": f"{TAR_NAMES[0]}/tiny-0001",
                                         "reason": "too_small", "step": "quality", "file": f"tars/{TAR_NAMES[0]}",
                                         "member": "tiny-0001.jpg"}
            if i == per_tar + per_tar // 2:
                # planted: the first 40% of a valid JPEG's bytes
                good = _encode(_draw(random.Random(f"trunc-{seed}"), 320, 240)[0], "JPEG")
                _tar_add(tf, "trunc-0001.jpg", good[: len(good) * 2 // 5])
                _tar_add(tf, "trunc-0001.txt", b"a picture whose file was cut short")
                planted["truncated_jpeg"] = {"source": "captions_wds",
                                             "source_key": f"{TAR_NAMES[tar_of[i]]}/trunc-0001",
                                             "reason": "corrupt_image", "step": "probe",
                                             "file": f"tars/{TAR_NAMES[tar_of[i]]}", "member": "trunc-0001.jpg"}
        # planted: 5 exact image duplicates, each in another tar under another key and caption
        for j, i in enumerate(rng.sample(range(n_tar), min(5, n_tar))):
            im, t_dup = images[i], (tar_of[i] + 1) % 3
            key = f"dup-{j:04d}"
            _tar_add(tars[t_dup], f"{key}.{im.ext}", im.data)
            _tar_add(tars[t_dup], f"{key}.txt", f"the same picture again: {im.caption}".encode())
            dup_pairs.append({"kind": "image", "source": "captions_wds", "reason": "duplicate_media",
                              "a": f"{TAR_NAMES[tar_of[i]]}/{i:06d}", "b": f"{TAR_NAMES[t_dup]}/{key}"})
    finally:
        for tf in tars:
            tf.close()

    files: list[tuple[str, Drawn]] = []
    for i in range(n_tar, n_images):
        name = f"images/img{i:05d}.{images[i].ext}"
        with open(os.path.join(root, name), "wb") as f:
            f.write(images[i].data)
        files.append((name, images[i]))
    cap_lines = [_dumps({"image": name, "caption": im.caption}) for name, im in files]
    missing_at = len(cap_lines) // 2
    cap_lines.insert(missing_at, _dumps({"image": "images/does_not_exist.jpg",
                                         "caption": "a picture nobody ever saved"}))
    _write_lines(os.path.join(root, "captions.jsonl"), cap_lines)
    planted["missing_path"] = {"source": "captions_manifest", "source_key": f"captions.jsonl:{missing_at + 1}",
                               "reason": "missing_file", "step": "probe", "file": "captions.jsonl",
                               "line": missing_at + 1, "missing": "images/does_not_exist.jpg"}
    log(f"  drew {n_images} images ({n_tar} in {len(TAR_NAMES)} tars, {len(files)} files)")

    # 2. videos with sidecar captions, encoded in parallel (each encoder is single-threaded)
    specs = video_plan(n_videos, seed)
    log(f"  encoding {n_videos} videos with ffmpeg ...")
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda s: _encode_video(os.path.join(root, "videos", s.name), s), specs))
    for s in specs:
        stem = os.path.join(root, "videos", s.name[:-4])
        if s.json_sidecar:
            with open(stem + ".json", "w", encoding="utf-8") as f:
                f.write(_dumps({"caption": s.caption, "tags": s.tags}) + "\n")
        else:
            with open(stem + ".txt", "w", encoding="utf-8") as f:
                f.write(s.caption + "\n")
    for j, s in enumerate(specs[:2]):
        copy = f"copy{j:03d}.mp4"
        shutil.copyfile(os.path.join(root, "videos", s.name), os.path.join(root, "videos", copy))
        with open(os.path.join(root, "videos", copy[:-4] + ".txt"), "w", encoding="utf-8") as f:
            f.write(f"A re-upload of an earlier clip: {s.caption[0].lower()}{s.caption[1:]}\n")
        dup_pairs.append({"kind": "video", "source": "videos", "reason": "duplicate_media", "a": s.name, "b": copy})
    open(os.path.join(root, "videos", "broken-empty.mp4"), "wb").close()
    with open(os.path.join(root, "videos", "broken-empty.txt"), "w", encoding="utf-8") as f:
        f.write("A clip whose upload never finished.\n")
    planted["zero_byte_video"] = {"source": "videos", "source_key": "broken-empty.mp4", "reason": "empty_file",
                                  "step": "probe", "file": "videos/broken-empty.mp4"}
    with open(os.path.join(root, "videos", "broken-text.mp4"), "w", encoding="utf-8") as f:
        f.write("not a video\n" + "this is a text file wearing a video extension\n" * 20)
    with open(os.path.join(root, "videos", "broken-text.txt"), "w", encoding="utf-8") as f:
        f.write("A clip that is really a text file.\n")
    planted["not_a_video"] = {"source": "videos", "source_key": "broken-text.mp4", "reason": "corrupt_video",
                              "step": "probe", "file": "videos/broken-text.mp4"}

    # 3. plain text documents, three whitespace/case variants, one line that is not JSON
    docs = [_doc(rng) for _ in range(60)]
    entries: list[tuple[str, int, str]] = [("doc", i, _dumps({"text": d})) for i, d in enumerate(docs)]
    for j, i in enumerate(sorted(rng.sample(range(40), 3))):
        entries.insert(45 + 5 * j, ("variant", i, _dumps({"text": _whitespace_case_variant(docs[i])})))
    entries.insert(30, ("bad", -1, '{"text": "unterminated'))
    line_of = {(kind, i): n for n, (kind, i, _) in enumerate(entries, 1)}
    _write_lines(os.path.join(root, "text.jsonl"), [line for _, _, line in entries])
    for kind, i, _ in entries:
        if kind == "variant":
            dup_pairs.append({"kind": "text", "source": "text", "reason": "duplicate_text",
                              "a": f"text.jsonl:{line_of[('doc', i)]}", "b": f"text.jsonl:{line_of[(kind, i)]}"})
    bad_line = line_of[("bad", -1)]
    planted["bad_json_line"] = {"source": "text", "source_key": f"text.jsonl:{bad_line}", "reason": "bad_json",
                                "step": "ingest", "file": "text.jsonl", "line": bad_line}

    # 4. conversations: LLaVA/ShareGPT, OpenAI messages, and video conversations
    conv: list[dict] = []
    for k in range(min(40, len(files))):
        name, im = files[k]
        turns = _qa(rng, im)
        conv.append({"id": f"conv-{k}", "image": name, "conversations": [
            {"from": "human" if t == 0 else "gpt", "value": text} for qa in turns
            for t, text in enumerate(qa)]})
        conv[-1]["conversations"][0]["value"] = "<image>\n" + conv[-1]["conversations"][0]["value"]
    systems = ("You are a careful visual assistant.", "Answer briefly and precisely.",
               "You describe pictures for people who cannot see them.")
    for k in range(min(20, len(files))):
        name, im = files[-1 - k]
        q, a = _qa(rng, im)[0]
        conv.append({"messages": [
            {"role": "system", "content": rng.choice(systems)},
            {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": a}]})
    for k, s in enumerate(specs[:4]):
        conv.append({"id": f"vconv-{k}", "video": f"videos/{s.name}", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in this clip?"},
            {"from": "gpt", "value": s.caption},
            {"from": "human", "value": "How long is it?"},
            {"from": "gpt", "value": f"About {s.duration:.1f} seconds."}]})
    s = specs[-1]
    conv.append({"messages": [
        {"role": "user", "content": [{"type": "video", "video": f"videos/{s.name}"},
                                     {"type": "text", "text": "Is this clip portrait or landscape?"}]},
        {"role": "assistant", "content": "Portrait." if s.height > s.width else "Landscape."}]})
    _write_lines(os.path.join(root, "conversations.jsonl"), [_dumps(c) for c in conv])

    # 5. interleaved documents: text with <image> placeholders and the images they stand for
    inter: list[str] = []
    for k in range(min(10, len(files) // 2)):
        picks = [files[(2 * k + j) % len(files)] for j in range(3 if k % 4 == 3 else 2)]
        body = _sentence(rng)
        for _, im in picks:
            body += f" <image> Above, {im.caption}. {_sentence(rng)}"
        inter.append(_dumps({"text": body, "images": [n for n, _ in picks]}))
    _write_lines(os.path.join(root, "interleaved.jsonl"), inter)

    # 6. preference pairs in Parquet, half about an image
    prefs: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "image": []}
    asked: set[tuple[str, str]] = set()
    for k in range(30):
        if k % 2 == 0:
            name, im = files[(k // 2) % len(files)]
            for _ in range(50):  # an image asked twice gets another question: no accidental duplicates
                q, a = _qa(rng, im)[0]
                if (name, q) not in asked:
                    break
            asked.add((name, q))
            wrong = rng.choice([c for c in sorted(COLORS) if c != im.background])
            prefs["prompt"].append(q)
            prefs["chosen"].append(a)
            prefs["rejected"].append(f"I think the whole picture is plain {wrong}, with nothing drawn on it.")
            prefs["image"].append(name)
        else:
            first, second = _sentence(rng), _sentence(rng)
            prefs["prompt"].append(f"Give the first of these two sentences back, word for word: {first} {second}")
            prefs["chosen"].append(first)
            prefs["rejected"].append(f"The {rng.choice(NOUN)} is {rng.choice(ADJ)}, I do not know.")
            prefs["image"].append(None)
    schema = pa.schema([(c, pa.string()) for c in ("prompt", "chosen", "rejected", "image")])
    pq.write_table(pa.table(prefs, schema=schema), os.path.join(root, "preferences.parquet"))

    # 7. what was planted, and the recipe
    planted = {k: planted[k] for k in ("truncated_jpeg", "zero_byte_video", "bad_json_line", "missing_path",
                                       "not_a_video", "tiny_image")}
    planted["duplicates"] = {"pairs": dup_pairs}
    with open(os.path.join(root, "planted.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(planted, indent=1, sort_keys=True) + "\n")
    # a tiny tokenizer trained on the corpus itself, saved as a transformers tokenizer folder:
    # the `tokens` step loads it through the same code path as a real model's tokenizer
    from reelforge.curation.tiny_models import build_tiny_tokenizer

    build_tiny_tokenizer(os.path.join(root, "tokenizer"), texts=docs, vocab_size=800)

    recipe = {
        "name": "demo", "seed": seed,
        "sources": [
            {"name": "captions_wds", "format": "webdataset", "path": "tars/"},
            {"name": "captions_manifest", "format": "jsonl", "path": "captions.jsonl"},
            {"name": "videos", "format": "video_folder", "path": "videos/"},
            {"name": "text", "format": "text", "path": "text.jsonl"},
            {"name": "conversations", "format": "jsonl", "path": "conversations.jsonl"},
            {"name": "interleaved", "format": "jsonl", "path": "interleaved.jsonl"},
            {"name": "preferences", "format": "parquet", "path": "preferences.parquet"},
        ],
        "steps": [
            {"probe": {"timeout_s": 30}},
            {"tokens": {"tokenizer": "tokenizer"}},
            {"dedup_exact": {}},
            {"quality": {"min_side": 16, "max_aspect": 200, "video_min_duration": 0.5,
                         "video_max_duration": 600, "text_min_chars": 1, "text_max_chars": 200000}},
            # Gopher/C4 rules with the demo's short documents in mind (DataTrove's defaults want 50+ words)
            {"text_quality": {"mode": "filter", "languages": ["en"], "min_doc_words": 10, "min_num_sentences": 1,
                              "min_stop_words": 1}},
        ],
        "output": {"path": "out", "shards": {"max_samples": 64, "max_bytes": "8MB", "shuffle": True,
                                             "prefix": "demo"}},
    }
    path = os.path.join(root, "recipe.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    log(f"  corpus ready in {time.monotonic() - t0:.1f}s: {path}")
    return path


def _qa(rng: random.Random, im: Drawn) -> list[tuple[str, str]]:
    """One to three question/answer turns that the drawing really answers."""
    colour, shape = rng.choice(im.shapes)
    same = [s for c, s in im.shapes if c == colour]
    pool = [
        (f"What shape is {colour}?", f"The {colour} shape is a {same[0]}." if len(same) == 1
         else f"There are {len(same)} {colour} shapes: " + " and ".join(_a(s) for s in same) + "."),
        ("What colour is the background?", f"The background is {im.background}."),
        ("How many shapes are in the picture?",
         f"There {'is one shape' if len(im.shapes) == 1 else f'are {len(im.shapes)} shapes'}: "
         + " and ".join(f"{_a(c)} {s}" for c, s in im.shapes) + "."),
        ("Describe the picture.", im.caption[0].upper() + im.caption[1:] + "."),
        (f"Is there {_a(shape)} in the image?", f"Yes, there is {_a(colour)} {shape}."),
    ]
    if im.word:
        pool.append(("What word is written in the picture?", f'It says "{im.word}".'))
    return rng.sample(pool, rng.randint(1, 3))


__all__ = ["PATTERNS", "VideoSpec", "make_demo_corpus", "video_plan"]
