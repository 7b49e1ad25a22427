"""A small, real, deterministic corpus for `reelforge demo` and the tests.

Images are drawn with PIL, videos are encoded by ffmpeg (H.264), and every source format
the readers know is present, with planted exact duplicates and planted broken inputs
recorded in `planted.json` (source, source_key, expected ledger reason).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from curation.tools import ffmpeg_path

COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "line")
WORDS = ("river city night light small large old new tree road house sky cloud sun market train bridge "
         "garden window music story paper table market winter summer forest ocean field stone glass").split()
LAVFI = ("testsrc2", "smptebars", "mandelbrot", "rgbtestsrc", "testsrc", "life")
SIZES = ((320, 240), (256, 144), (480, 270), (240, 320), (320, 180))


def _draw(rng: random.Random, w: int, h: int) -> tuple[Image.Image, str]:
    bg_name, bg = rng.choice(list(COLORS.items()))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    parts = []
    for _ in range(rng.randint(1, 3)):
        name, col = rng.choice([c for c in COLORS.items() if c[0] != bg_name])
        shape = rng.choice(SHAPES)
        x0, y0 = rng.randint(0, max(1, w - 8)), rng.randint(0, max(1, h - 8))
        x1, y1 = min(w, x0 + rng.randint(4, max(5, w // 2))), min(h, y0 + rng.randint(4, max(5, h // 2)))
        if shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=col)
        elif shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=col)
        elif shape == "triangle":
            d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=col)
        else:
            d.line([x0, y0, x1, y1], fill=col, width=3)
        parts.append(f"a {name} {shape}")
    caption = " and ".join(parts) + f" on a {bg_name} background"
    return img, caption


def _encode(img: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return b.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o644, "demo", "demo"
    tf.addfile(ti, io.BytesIO(data))


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    return " ".join(words).capitalize() + "."


def _doc(rng: random.Random) -> str:
    return "\n\n".join(" ".join(_sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(1, 3)))


def _video(path: str, src: str, size: tuple[int, int], fps: int, seconds: float) -> None:
    cmd = [ffmpeg_path(), "-loglevel", "error", "-y", "-f", "lavfi",
           "-i", f"{src}=size={size[0]}x{size[1]}:rate={fps}", "-t", f"{seconds}",
           "-c:v", "libx264", "-preset", "ultrafast", "-threads", "1", "-pix_fmt", "yuv420p",
           "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1", path]
    subprocess.run(cmd, check=True, timeout=120, stdin=subprocess.DEVNULL)


def make_demo_corpus(root: str, n_images: int = 300, n_videos: int = 24, seed: int = 0,
                     log: Callable[[str], None] = print) -> str:
    """Write the corpus under `root` and return the path of its recipe."""
    rng = random.Random(seed)
    if os.path.isdir(root):
        shutil.rmtree(root)
    for sub in ("tars", "images", "videos"):
        os.makedirs(os.path.join(root, sub))
    planted: dict[str, dict] = {}

    # images: 2/3 in img2dataset tars, 1/3 as files named by a JSONL manifest
    n_tar = n_images * 2 // 3
    images = []
    for i in range(n_images):
        w = rng.choice((64, 96, 128, 200, 256, 320, 480, 640))
        h = rng.choice((64, 96, 128, 200, 256, 320, 480))
        if i % 25 == 7:
            w, h = 480, 120  # 4:1 panoramas
        img, cap = _draw(rng, w, h)
        fmt = "PNG" if i % 17 == 3 else "WEBP" if i % 19 == 5 else "JPEG"
        images.append((_encode(img, fmt), {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt], cap, w, h))
    per_tar = max(1, (n_tar + 2) // 3)
    tar_names = [f"part-{t:05d}.tar" for t in range(3)]
    tars = [tarfile.open(os.path.join(root, "tars", n), "w", format=tarfile.USTAR_FORMAT) for n in tar_names]
    for i in range(n_tar):
        data, ext, cap, w, h = images[i]
        t = min(i // per_tar, 2)
        key = f"{i:06d}"
        _add(tars[t], f"{key}.{ext}", data)
        _add(tars[t], f"{key}.txt", cap.encode())
        _add(tars[t], f"{key}.json", json.dumps({"url": f"https://example.invalid/{key}.{ext}", "caption": cap,
                                                 "width": w, "height": h}, sort_keys=True).encode())
    # planted: exact media duplicates in another tar under new keys
    dup_pairs = []
    for j in range(min(5, n_tar)):
        data, ext, cap, _, _ = images[j]
        key = f"dup{j:03d}"
        _add(tars[2], f"{key}.{ext}", data)
        _add(tars[2], f"{key}.txt", f"another caption for the same picture {j}".encode())
        dup_pairs.append({"kind": "image", "source": "captions_wds",
                          "a": f"{tar_names[min(j // per_tar, 2)]}/{j:06d}", "b": f"{tar_names[2]}/{key}"})
    # planted: a truncated JPEG and a 2x2 JPEG
    good = _encode(_draw(rng, 320, 240)[0], "JPEG")
    _add(tars[1], "trunc0.jpg", good[: len(good) * 2 // 5])
    _add(tars[1], "trunc0.txt", b"this picture was cut short")
    planted["truncated_jpeg"] = {"source": "captions_wds", "source_key": f"{tar_names[1]}/trunc0",
                                 "reason": "corrupt_image"}
    _add(tars[0], "tiny0.jpg", _encode(Image.new("RGB", (2, 2), (9, 9, 9)), "JPEG"))
    _add(tars[0], "tiny0.txt", b"a picture of two by two pixels")
    planted["tiny_image"] = {"source": "captions_wds", "source_key": f"{tar_names[0]}/tiny0", "reason": "too_small"}
    for t in tars:
        t.close()

    files = []
    for i in range(n_tar, n_images):
        data, ext, cap, _, _ = images[i]
        name = f"images/img{i:05d}.{ext}"
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        files.append((name, cap))
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        for name, cap in files:
            f.write(json.dumps({"image": name, "caption": cap}) + "\n")
        f.write(json.dumps({"image": "images/does_not_exist.jpg", "caption": "a file nobody wrote"}) + "\n")
    planted["missing_path"] = {"source": "captions_manifest", "source_key": f"captions.jsonl:{len(files) + 1}",
                               "reason": "missing_file"}

    # videos with sidecar captions
    log(f"  encoding {n_videos} videos with ffmpeg ...")
    vids = []
    for v in range(n_videos):
        src, size = LAVFI[v % len(LAVFI)], SIZES[v % len(SIZES)]
        fps, secs = (24, 25, 30)[v % 3], round(1 + (v * 7 % 11) / 2, 1)
        name = f"videos/clip{v:03d}.mp4"
        _video(os.path.join(root, name), src, size, fps, secs)
        cap = f"a {secs} second {src} test pattern at {size[0]}x{size[1]}, {fps} frames per second"
        stem = os.path.join(root, name[:-4])
        if v % 3 == 2:
            with open(stem + ".json", "w") as f:
                json.dump({"caption": cap, "tags": [src, "synthetic"]}, f, sort_keys=True)
        else:
            with open(stem + ".txt", "w") as f:
                f.write(cap + "\n")
        vids.append(name)
    for j in range(min(2, n_videos)):
        copy = f"videos/copy{j:03d}.mp4"
        shutil.copyfile(os.path.join(root, vids[j]), os.path.join(root, copy))
        with open(os.path.join(root, copy[:-4] + ".txt"), "w") as f:
            f.write(f"the same clip again, number {j}\n")
        dup_pairs.append({"kind": "video", "source": "videos", "a": os.path.basename(vids[j]),
                          "b": os.path.basename(copy)})
    open(os.path.join(root, "videos", "broken_empty.mp4"), "wb").close()
    with open(os.path.join(root, "videos", "broken_empty.txt"), "w") as f:
        f.write("a video of zero bytes\n")
    planted["zero_byte_video"] = {"source": "videos", "source_key": "broken_empty.mp4", "reason": "empty_file"}
    with open(os.path.join(root, "videos", "broken_text.mp4"), "w") as f:
        f.write("this is a text file wearing a video extension\n" * 20)
    with open(os.path.join(root, "videos", "broken_text.txt"), "w") as f:
        f.write("not really a video\n")
    planted["not_a_video"] = {"source": "videos", "source_key": "broken_text.mp4", "reason": "corrupt_video"}

    # plain text documents, with whitespace/case variants as duplicates and one bad line
    docs = [_doc(rng) for _ in range(60)]
    lines = [json.dumps({"text": d}) for d in docs]
    for j in range(3):
        lines.append(json.dumps({"text": "  " + docs[j].upper().replace(" ", "   ") + "\n"}))
        dup_pairs.append({"kind": "text", "source": "text", "a": f"text.jsonl:{j + 1}",
                          "b": f"text.jsonl:{len(lines)}"})
    lines.append('{"text": "unterminated')
    planted["bad_json_line"] = {"source": "text", "source_key": f"text.jsonl:{len(lines)}", "reason": "bad_json"}
    with open(os.path.join(root, "text.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")

    # conversations: ShareGPT, OpenAI messages, and video conversations
    conv = []
    for k in range(min(40, len(files))):
        name, cap = files[k]
        conv.append({"id": f"conv-{k}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in this picture?"},
            {"from": "gpt", "value": cap[0].upper() + cap[1:] + "."},
            {"from": "human", "value": "Describe it in one more sentence."},
            {"from": "gpt", "value": _sentence(rng)}]})
    for k in range(min(20, len(files))):
        name, cap = files[-1 - k]
        conv.append({"messages": [
            {"role": "system", "content": "You are a careful visual assistant."},
            {"role": "user", "content": [{"type": "image", "image": name},
                                         {"type": "text", "text": "Which colours do you see?"}]},
            {"role": "assistant", "content": cap}]})
    for k, name in enumerate(vids[: max(1, n_videos // 4)]):
        conv.append({"id": f"vconv-{k}", "video": name, "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in this clip?"},
            {"from": "gpt", "value": "A synthetic test pattern moves across the frame."}]})
    with open(os.path.join(root, "conversations.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(c) for c in conv) + "\n")

    # interleaved documents
    with open(os.path.join(root, "interleaved.jsonl"), "w") as f:
        for k in range(min(10, len(files) // 2)):
            a, b = files[2 * k][0], files[2 * k + 1][0]
            f.write(json.dumps({"text": f"{_sentence(rng)} <image> {_sentence(rng)} <image> {_sentence(rng)}",
                                "images": [a, b]}) + "\n")

    # preference pairs in Parquet
    prefs = {"prompt": [], "chosen": [], "rejected": [], "image": []}
    for k in range(30):
        with_img = k % 2 == 0 and files
        prefs["prompt"].append("Describe the picture." if with_img else f"Summarise: {_sentence(rng)}")
        prefs["chosen"].append(files[k % len(files)][1] if with_img else _sentence(rng))
        prefs["rejected"].append("I cannot see anything." if with_img else "No.")
        prefs["image"].append(files[k % len(files)][0] if with_img else None)
    pq.write_table(pa.table(prefs), os.path.join(root, "preferences.parquet"))

    planted["duplicates"] = {"pairs": dup_pairs}
    with open(os.path.join(root, "planted.json"), "w") as f:
        json.dump(planted, f, indent=1, sort_keys=True)
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
            {"dedup_exact": {}},
            {"quality": {"min_side": 16, "max_aspect": 200, "video_min_duration": 0.5,
                         "video_max_duration": 600, "text_min_chars": 1, "text_max_chars": 200000}},
        ],
        "output": {"path": "out", "shards": {"max_samples": 64, "max_bytes": "8MB", "shuffle": True,
                                             "prefix": "demo"}},
    }
    import yaml

    path = os.path.join(root, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path
