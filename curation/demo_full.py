"""`reelforge demo --full`: a small corpus that gives every step of a full recipe work to do.

`make_full_corpus` writes, beside each other under the demo's folder:
- `corpus/`: drawn images in a JSONL manifest (with re-encoded/resized near-copies and one
  byte-exact copy), four H.264 videos (one with a real scene cut, three with time-grounded
  video QA), text documents (near-duplicates, spam, and one copied from the evaluation set),
  the source data of the five cold-start modes (reasoning answers, plain answers, auto-think
  rows, think-with-image tool code, video QA), a small evaluation set whose items are
  near-copies of some corpus images and texts, the demo's tokenizer, `planted.json` (what was
  planted where, by source key) and `recipe.yaml`;
- `models/`: a tiny random CLIP (open_clip config + state dict) and a tiny random Qwen2.5-VL
  (`save_pretrained` folder), loaded by the steps through the same code path as real checkpoints.

`where_to_look` reads a finished run (report, ledger and shards; no Spark) and says, per step,
where its result can be seen. Counts stay small (about 40 images, 4 videos, 30 texts, 6 rows
per mode) so the whole run fits in a few minutes on two cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from collections import Counter
from typing import Any, Callable

import yaml
from PIL import Image

from reelforge.curation.demo_corpus import (
    VideoSpec,
    _a,
    _dumps,
    _encode_video,
    _hex,
    _make_images,
    _sentence,
    _write_lines,
)
from reelforge.curation.tools import ffmpeg_path

N_IMAGES = 40  # 30 image-caption pairs, 10 for the mode sources
N_CAPTION_IMAGES = 30
NEAR_COPIES = (0, 1, 2, 3)  # images re-encoded and resized: near duplicates
EXACT_COPY = 6  # an image copied byte for byte: an exact duplicate
LEAKED_IMAGES = (4, 5)  # images the evaluation set holds near-copies of
MODE_ROWS = 6
CLIP_MODEL = "reelforge-tiny-clip"
VLM_FOLDER = "tiny-qwen2_5-vl"
OWNED = ("images", "videos", "evals", "tokenizer", "images.jsonl", "text.jsonl", "reasoning.jsonl",
         "plain.jsonl", "auto.jsonl", "agent.jsonl", "planted.json", "recipe.yaml", "grounding", "ocr.jsonl",
         "math.jsonl")
WHISPER_FOLDER = "tiny-whisper"
SPEECH = "Welcome to the reelforge demo. This short video has a voice, and the speech step writes it down."
# the data-task builders' children, by the end of their id (`<parent>@...`): task name by prefix
TASK_PREFIXES = (("frame_order", "video: frame order"), ("clip_match", "video: clip matching"),
                 ("temporal_grounding", "video: temporal grounding"), ("dense_captions", "video: dense captions"),
                 ("asr_interleave", "ASR interleaved with frames"), ("ground_ref", "grounding: referring"),
                 ("ground_caption", "grounding: grounded caption"), ("ground_count", "grounding: counting"),
                 ("synth_ocr_text", "OCR: text"), ("synth_ocr_table", "OCR: table"), ("synth_ocr_code", "OCR: code"),
                 ("thinking", "modes by share: thinking copy"), ("non_thinking", "modes by share: non-thinking copy"))
MODE_SOURCES = {"reasoning": "thinking", "plain": "non_thinking", "auto": "auto_think",
                "agent": "think_with_image", "videos": "video"}
SPAM = (
    "BUY NOW!!! CHEAP PILLS $$$ CLICK HERE >>> http://deals.example.invalid/offer?id=777 !!! " * 6,
    "win " * 80,
    "cheap flights hotels casino poker bonus free money loans discount crypto deals casino poker bonus "
    "free money loans discount crypto deals",
    "#### $$$$ %%%% @@@@ &&&& **** ^^^^ ~~~~ |||| #### $$$$ %%%% @@@@ &&&& **** ^^^^ ~~~~ ||||",
    "qzx vbnm kjhg wrtp zzkx qqwv plmk xxcv bnmq trwq zxcv lkjh mnbv poiu ytre wqas dfgh jklz",
)


def _prepare(root: str, owned: tuple[str, ...], marker: str) -> None:
    """Remove what an earlier demo wrote here, but never a folder that is not a demo's."""
    if os.path.isdir(root) and os.listdir(root):
        if not os.path.exists(os.path.join(root, marker)):
            raise ValueError(f"{root} is not empty and holds no full demo ({marker} is missing): "
                             "pass an empty or new folder.")
        for name in owned:
            p = os.path.join(root, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(root, exist_ok=True)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    b = io.BytesIO()
    img.convert("RGB").save(b, "JPEG", quality=quality)
    return b.getvalue()


def _near_copy(data: bytes, quality: int = 60, scale: float = 0.75) -> bytes:
    """Re-encoded and resized: other bytes, the same picture to a perceptual hash."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        return _jpeg(im.resize((max(32, int(im.width * scale)), max(32, int(im.height * scale)))), quality)


def _leak_copy(data: bytes) -> bytes:
    """A re-encoded copy (other bytes) whose pHash, as the probe step computes it, is the original's:
    the leakage step's default rule (the report's: pHash bit-sets at Jaccard > 0.95) only matches
    identical pHashes, since every pHash has 32 one-bits (2 bits apart is already 0.94)."""
    from reelforge.curation.probe import probe_image

    want = probe_image(data, 1 << 40, True)["phash"]
    for quality in (95, 90, 85, 80, 75):
        out = _near_copy(data, quality=quality, scale=1.0)
        if out != data and probe_image(out, 1 << 40, True)["phash"] == want:
            return out
    raise RuntimeError("no JPEG re-encoding keeps this demo image's pHash")


def _unrelated_images(corpus: list, n: int, rng: random.Random, min_bits: int = 20) -> list:
    """`n` drawn images whose perceptual hash is far from every corpus image's: evaluation
    items that must not leak (plain drawings can share a pHash by chance)."""
    from reelforge.curation.phash import phash_image

    def ph(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as im:
            return phash_image(im)

    taken = [ph(im.data) for im in corpus]
    out = []
    while len(out) < n:
        (im,) = _make_images(1, rng)
        h = ph(im.data)
        if all(bin((h ^ t) & (2**64 - 1)).count("1") >= min_bits for t in taken):
            out.append(im)
            taken.append(h)
    return out


def _long_doc(rng: random.Random, sentences: int = 12) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _edit_one_word(doc: str, rng: random.Random) -> str:
    """The same document with one word in its middle changed (a near duplicate, not an exact one)."""
    words = doc.split(" ")
    i = len(words) // 2 + rng.randrange(3)
    words[i] = "yesterday" if words[i] != "yesterday" else "tomorrow"
    return " ".join(words)


def _videos() -> list[tuple[VideoSpec, dict | None]]:
    """Four 2-3 s clips: one made of two shots (the clips step cuts it), three with video QA."""
    w, h, fps = 160, 120, 25
    s = f"s={w}x{h}:r={fps}"
    cut = (f"smptebars={s},trim=duration=1.6,setpts=PTS-STARTPTS,format=yuv420p,setsar=1[a];"
           f"testsrc2={s},trim=duration=1.6,setpts=PTS-STARTPTS,format=yuv420p,setsar=1[b];"
           "[a][b]concat=n=2:v=1:a=0[out0]")
    bar = (f"color=c={_hex('teal')}:{s}[bg];color=c={_hex('yellow')}:s={w}x12:r={fps}[fg];"
           "[bg][fg]overlay=x=0:y=t*30[out0]")
    box = (f"color=c={_hex('blue')}:{s}[bg];color=c={_hex('orange')}:s=24x24:r={fps}[fg];"
           "[bg][fg]overlay=x=t*40:y=H/2-h/2[out0]")
    out = [
        (VideoSpec("clip000.mp4", "two_shots", w, h, fps, 80, cut,
                   "A 3.2 second clip: SMPTE colour bars, then a cut to the testsrc2 test pattern.",
                   ["test card", "scene cut"]), None),
        (VideoSpec("clip001.mp4", "falling_bar", w, h, fps, 75, bar,
                   "A yellow bar falling from top to bottom over a teal background.", ["motion"]),
         {"question": "When is the yellow bar in the lower half of the frame?",
          "answer": "It falls into the lower half {0}.", "spans": [[1.8, 3.0]],
          "reasoning": "The bar falls 30 pixels a second from the top; the middle of the 120-pixel frame lies "
                       "54 pixels below its starting edge, which it passes after 1.8 s."}),
        (VideoSpec("clip002.mp4", "sliding_box", w, h, fps, 60, box,
                   "An orange square sliding left to right across a blue background.", ["motion"]),
         {"question": "When does the orange square cross the middle of the frame?",
          "answer": "It crosses the middle {0}.", "spans": [[1.4, 2.0]]}),
        (VideoSpec("clip003.mp4", "testsrc2", w, h, fps, 50, f"testsrc2={s}",
                   "The testsrc2 colour test pattern with a moving gradient and a frame counter.",
                   ["test pattern"]),
         {"question": "When is the test pattern on screen?", "answer": "The whole clip, {0}.",
          "spans": [[0.0, 2.0]]}),
    ]
    return out


OCR_TEXTS = (
    "Shipping note: three crates of blue tiles leave the north depot on Monday and reach the harbour by "
    "Thursday morning, where the night crew checks every label against the manifest.",
    "数据团队每天清洗视频语料，去掉重复片段，再为每个片段写出新的描述。",
    "def count_frames(video):\n    total = 0\n    for frame in video:\n        if frame.is_key:\n"
    "            total += 1\n    return total\n",
)


def _speech_video(path: str, text: str) -> None:
    """A 160x120 Mandelbrot zoom with a voice (espeak-ng, 16 kHz mono AAC), bit-exact."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("the full demo's speech video needs espeak-ng: install it (`make system`, or "
                           "`apt-get install espeak-ng`)")
    wav = path + ".wav"
    try:
        subprocess.run([espeak, "-v", "en", "-s", "160", "-w", wav, text], check=True, capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
        cmd = [ffmpeg_path(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "mandelbrot=s=160x120:r=25",
               "-i", wav, "-shortest", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "28", "-threads", "1",
               "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "1", "-ar", "16000", "-b:a", "32k",
               "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1", path]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"ffmpeg failed on the speech video: {res.stderr.strip()[-500:]}")
    finally:
        if os.path.exists(wav):
            os.remove(wav)


GROUNDING_SHAPES = (("square", (230, 60, 40)), ("circle", (40, 90, 220)))
GROUNDING_BACKGROUNDS = ((245, 240, 225), (20, 30, 30), (250, 230, 60), (120, 200, 120))


def _grounding_source(folder: str, rng: random.Random, n_images: int = 4) -> dict:
    """COCO-style `instances_demo.json` over drawn 160x120 PNGs with 1-3 squares and circles each, on
    backgrounds far apart (so near-dedup keeps them all); returns {"image<id>": {category: count}}
    (what the counting questions must answer; the reader's source keys end in `#image<id>`)."""
    from PIL import ImageDraw

    os.makedirs(folder)
    cats = [{"id": i + 1, "name": name} for i, (name, _) in enumerate(GROUNDING_SHAPES)]
    images, anns, counts = [], [], {}
    for i in range(n_images):
        name = f"g{i:03d}.png"
        im = Image.new("RGB", (160, 120), GROUNDING_BACKGROUNDS[i % len(GROUNDING_BACKGROUNDS)])
        d = ImageDraw.Draw(im)
        for k in range(0, 160, 20 + 10 * i):  # a stripe pattern of its own: distinct perceptual hashes
            d.line([(k, 0), (k + 40 * (i % 2 * 2 - 1), 119)], fill=(128, 128, 128), width=2 + i)
        key = f"image{i + 1}"
        counts[key] = {}
        for j in range(1 + i % 3):
            c = (i + j) % len(GROUNDING_SHAPES)
            cat, colour = GROUNDING_SHAPES[c]
            x, y, side = 8 + 50 * j + rng.randint(0, 6), rng.randint(10, 60), rng.randint(24, 40)
            (d.rectangle if cat == "square" else d.ellipse)([x, y, x + side - 1, y + side - 1], fill=colour)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [x, y, side, side],
                         "area": side * side, "iscrowd": 0})
            counts[key][cat] = counts[key].get(cat, 0) + 1
        im.save(os.path.join(folder, name))
        images.append({"id": i + 1, "file_name": name, "width": 160, "height": 120})
    with open(os.path.join(folder, "instances_demo.json"), "w", encoding="utf-8") as f:
        f.write(_dumps({"images": images, "annotations": anns, "categories": cats}) + "\n")
    return counts


def _math_rows() -> list[dict]:
    """Text questions with reasoning: the `modes` step emits each in thinking and non-thinking form."""
    rows = []
    for a, b in ((17, 25), (38, 46), (123, 77), (64, 59)):
        rows.append({"reasoning": f"Add the tens and the ones of {a} and {b}: the total is {a + b}.",
                     "conversations": [{"from": "human", "value": f"What is {a} plus {b}?"},
                                       {"from": "gpt", "value": str(a + b)}]})
    return rows


def task_counts(samples: list[dict]) -> dict[str, int]:
    """How many samples of each data task are in the shards: builders' children by their id's
    last `@` part, and the videos whose speech was transcribed (`meta.asr` with segments)."""
    counts: dict[str, int] = {label: 0 for _, label in TASK_PREFIXES}
    counts["ASR: videos transcribed"] = 0
    for js in samples:
        tail = js["id"].rsplit("@", 1)[1] if "@" in js["id"] else ""
        for prefix, label in TASK_PREFIXES:
            if tail == prefix or tail.startswith(prefix + "_") or tail.startswith(prefix + "-"):
                counts[label] += 1
                break
        meta = js.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta or "{}")
        if (meta.get("asr") or {}).get("segments") and "@" not in js["id"]:
            counts["ASR: videos transcribed"] += 1
    return counts


def _shape_list(shapes: list[tuple[str, str]]) -> str:
    return " and ".join(f"{_a(c)} {s}" for c, s in shapes)


def _mode_rows(files: list[tuple[str, Any]], rng: random.Random) -> dict[str, list[dict]]:
    """Source data for thinking, non-thinking, auto-think and think-with-image, plus one
    planted failure each for the repetition and format-consistency filters."""
    rows: dict[str, list[dict]] = {"reasoning": [], "plain": [], "auto": [], "agent": []}
    for k in range(MODE_ROWS + 1):
        name, im = files[k % len(files)]
        n = len(im.shapes)
        reasoning = (f"I look at each shape in turn: {_shape_list(im.shapes)}. "
                     f"Counting them one by one gives {n}.")
        answer = str(n + 1) if k == MODE_ROWS else str(n)  # the last one disagrees with its reasoning
        rows["reasoning"].append({"image": name, "reasoning": reasoning, "conversations": [
            {"from": "human", "value": f"<image>\nHow many shapes are drawn in picture {k}?"},
            {"from": "gpt", "value": answer}]})
        plain = f"The background is {im.background}."
        if k == MODE_ROWS:  # a looping answer: the repetition filter's
            plain = "The background is blue and " * 12
        rows["plain"].append({"image": name, "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is the background of picture {k}?"},
            {"from": "gpt", "value": plain}]})
    for k in range(MODE_ROWS):
        name, im = files[(k + 3) % len(files)]
        if k % 2 == 0:
            colour, _ = im.shapes[0]
            same = sum(c == colour for c, _ in im.shapes)
            rows["auto"].append({"image": name, "think": True,
                                 "reasoning": f"The shapes are {_shape_list(im.shapes)}; the {colour} ones "
                                              f"are counted, which makes {same}.",
                                 "conversations": [{"from": "human", "value": f"<image>\nHow many {colour} "
                                                                              f"shapes are there?"},
                                                   {"from": "gpt", "value": str(same)}]})
        else:
            rows["auto"].append({"image": name, "think": False,
                                 "reasoning": f"The background is plainly {im.background}.",
                                 "conversations": [{"from": "human", "value": "<image>\nWhat colour is the "
                                                                              "background?"},
                                                   {"from": "gpt", "value": f"It is {im.background}."}]})
    tools = (
        [{"thought": "Crop the left half to look closer.",
          "code": "w, h = image.size\nresult = image.crop((0, 0, max(1, w // 2), h))"}],
        [{"thought": "Rotate the picture upright.", "code": "result = image.rotate(90, expand=True)"},
         {"thought": "Raise the contrast to separate the colours.",
          "code": "result = ImageEnhance.Contrast(image).enhance(1.8)"}],
        [{"thought": "Zoom into the centre.",
          "code": "w, h = image.size\nresult = image.crop((w // 4, h // 4, max(w // 4 + 1, 3 * w // 4), "
                  "max(h // 4 + 1, 3 * h // 4))).resize((w, h))"}],
    )
    for k in range(MODE_ROWS):
        name, im = files[(k + 5) % len(files)]
        rows["agent"].append({"image": name, "tool_steps": tools[k % len(tools)],
                              "final_thought": f"The enlarged view shows the {im.background} background clearly.",
                              "conversations": [{"from": "human", "value": "<image>\nLook closely: what colour "
                                                                           "is the background?"},
                                                {"from": "gpt", "value": f"{im.background.capitalize()}."}]})
    return rows


def make_full_corpus(root: str, models: str, seed: int = 0, log: Callable[..., None] = print) -> str:
    """Write the full demo's corpus under `root` and its tiny models under `models`; returns
    the recipe's path (`root/recipe.yaml`). Same seed, same corpus bytes."""
    t0 = time.monotonic()
    root, models = os.path.abspath(root), os.path.abspath(models)
    _prepare(root, OWNED, "planted.json")
    _prepare(models, ("clip", VLM_FOLDER, WHISPER_FOLDER), "clip")
    for sub in ("images", "videos", "evals"):
        os.makedirs(os.path.join(root, sub))
    rng = random.Random(f"reelforge-demo-full-{seed}")
    planted: dict[str, Any] = {}

    # 1. images: captions in a manifest; near-copies, an exact copy, and two the evaluation set leaks
    images = _make_images(N_IMAGES, rng)
    lines, files = [], []
    for i, im in enumerate(images):
        name = f"images/img{i:03d}.{im.ext}"
        with open(os.path.join(root, name), "wb") as f:
            f.write(im.data)
        files.append((name, im))
        if i < N_CAPTION_IMAGES:
            lines.append({"image": name, "caption": im.caption})
    near = []
    for i in NEAR_COPIES:
        name = f"images/near{i:03d}.jpg"
        with open(os.path.join(root, name), "wb") as f:
            f.write(_near_copy(images[i].data, quality=55 + 10 * i))
        lines.append({"image": name, "caption": f"the same drawing, smaller: {images[i].caption}"})
        near.append({"a": f"images.jsonl:{i + 1}", "b": f"images.jsonl:{len(lines)}"})
    exact_name = f"images/copy{EXACT_COPY:03d}.{images[EXACT_COPY].ext}"
    shutil.copyfile(os.path.join(root, files[EXACT_COPY][0]), os.path.join(root, exact_name))
    lines.append({"image": exact_name, "caption": f"a re-upload: {images[EXACT_COPY].caption}"})
    planted["exact_duplicates"] = [{"a": f"images.jsonl:{EXACT_COPY + 1}", "b": f"images.jsonl:{len(lines)}"}]
    _write_lines(os.path.join(root, "images.jsonl"), [_dumps(x) for x in lines])

    # 2. videos: H.264 made by ffmpeg; the first has two shots, the others carry video QA
    specs = _videos()
    log(f"  encoding {len(specs)} videos with ffmpeg ...")
    for spec, qa in specs:
        _encode_video(os.path.join(root, "videos", spec.name), spec)
        stem = os.path.join(root, "videos", spec.name[:-4])
        if qa is None:
            with open(stem + ".txt", "w", encoding="utf-8") as f:
                f.write(spec.caption + "\n")
        else:
            with open(stem + ".json", "w", encoding="utf-8") as f:
                f.write(_dumps({"caption": spec.caption, "tags": spec.tags, "video_qa": qa}) + "\n")
    planted["scene_cut"] = {"source": "videos", "source_key": specs[0][0].name, "cut_s": 1.6}
    planted["video_qa"] = [s.name for s, qa in specs if qa is not None]

    # 3. text: documents, near-duplicate edits, spam, a doubled document, one copied from the benchmark
    docs = [_long_doc(rng, rng.randint(6, 9)) for _ in range(16)]  # long enough for Gopher's 50 words
    bases = [_long_doc(rng) for _ in range(3)]
    copies = [_edit_one_word(b, rng) for b in bases]
    leaked_text = _long_doc(rng, 8)
    entries = ([("doc", i, d) for i, d in enumerate(docs[:8])]
               + [("near_base", i, b) for i, b in enumerate(bases)]
               + [("doc", i, d) for i, d in enumerate(docs[8:], 8)]
               + [("near_copy", i, c) for i, c in enumerate(copies)])
    entries.insert(12, ("leak", 0, leaked_text))
    entries.insert(6, ("exact_copy", 2, "  " + docs[2].upper().replace(" ", "  ") + "\n"))
    for j, s in enumerate(SPAM):
        entries.insert(4 + 5 * j, ("spam", j, s))
    _write_lines(os.path.join(root, "text.jsonl"), [_dumps({"text": t}) for _, _, t in entries])
    key = {(k, i): f"text.jsonl:{n}" for n, (k, i, _) in enumerate(entries, 1)}
    near += [{"a": key[("near_base", i)], "b": key[("near_copy", i)]} for i in range(len(bases))]
    planted["near_duplicates"] = near
    planted["exact_duplicates"].append({"a": key[("doc", 2)], "b": key[("exact_copy", 2)]})
    planted["spam"] = [key[("spam", j)] for j in range(len(SPAM))]
    planted["good_text"] = [key[(k, i)] for k, i, _ in entries if k in ("doc", "near_base")]

    # 4. the evaluation set: near-copies of two corpus images, the copied document, and unrelated items
    ev = []
    for j, i in enumerate(LEAKED_IMAGES):
        with open(os.path.join(root, "evals", f"q{j}.jpg"), "wb") as f:
            f.write(_leak_copy(images[i].data))
        ev.append({"image": f"q{j}.jpg", "question": "What is drawn in this picture?",
                   "answer": _shape_list(images[i].shapes)})
    ev.append({"question": leaked_text, "answer": "yes"})
    for j, im in enumerate(_unrelated_images(images, 2, random.Random(f"reelforge-demo-full-eval-{seed}"))):
        with open(os.path.join(root, "evals", f"u{j}.{im.ext}"), "wb") as f:
            f.write(im.data)
        ev.append({"image": f"u{j}.{im.ext}", "question": "What colour is the background?", "answer": im.background})
    ev.append({"question": _long_doc(rng, 4), "answer": "no"})
    _write_lines(os.path.join(root, "evals", "bench.jsonl"), [_dumps(x) for x in ev])
    planted["leaks"] = [f"images.jsonl:{i + 1}" for i in LEAKED_IMAGES] + [key[("leak", 0)]]

    # 5. the cold-start modes' sources (the video mode reads the videos' QA)
    mode_rows = _mode_rows(files[N_CAPTION_IMAGES:], rng)
    for name, rows in mode_rows.items():
        _write_lines(os.path.join(root, f"{name}.jsonl"), [_dumps(r) for r in rows])
    planted["inconsistent"] = f"reasoning.jsonl:{MODE_ROWS + 1}"
    planted["repetitive"] = f"plain.jsonl:{MODE_ROWS + 1}"
    planted["modes"] = MODE_SOURCES
    log(f"  wrote {len(lines)} image rows, {len(specs)} videos, {len(entries)} texts, "
        f"{sum(len(r) for r in mode_rows.values())} mode rows, {len(ev)} evaluation items")

    # 6. the data-task builders' inputs: a video with a voice (espeak-ng), grounding boxes (COCO
    # JSON), text to render (Latin, CJK, code) and a source whose questions go out in two modes
    _speech_video(os.path.join(root, "videos", "talk004.mp4"), SPEECH)
    with open(os.path.join(root, "videos", "talk004.txt"), "w", encoding="utf-8") as f:
        f.write("A Mandelbrot zoom while a voice reads a sentence.\n")
    planted["speech"] = {"source": "videos", "source_key": "talk004.mp4", "text": SPEECH}
    planted["grounding"] = _grounding_source(os.path.join(root, "grounding"), rng)
    _write_lines(os.path.join(root, "ocr.jsonl"), [_dumps({"text": t}) for t in OCR_TEXTS])
    _write_lines(os.path.join(root, "math.jsonl"), [_dumps(r) for r in _math_rows()])
    planted["mode_shares"] = {"math": {"thinking": 0.5, "non_thinking": 0.5}}
    with open(os.path.join(root, "planted.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(planted, indent=1, sort_keys=True) + "\n")

    # 7. the tokenizer and the tiny models, saved as their real counterparts are
    from reelforge.curation.tiny_clip import build_tiny_clip
    from reelforge.curation.tiny_models import build_tiny_tokenizer
    from reelforge.curation.tiny_vlm import build_tiny_vlm
    from reelforge.curation.tiny_whisper import build_tiny_whisper

    build_tiny_tokenizer(os.path.join(root, "tokenizer"), texts=docs + bases, vocab_size=800)
    log(f"  building tiny random models in {models} ...")
    with _quiet_builders():
        build_tiny_clip(os.path.join(models, "clip"), name=CLIP_MODEL, seed=seed)
        build_tiny_vlm(os.path.join(models, VLM_FOLDER), seed=seed)
        build_tiny_whisper(os.path.join(models, WHISPER_FOLDER), seed=seed)

    rel_models = os.path.relpath(models, root)
    clip_dir = os.path.join(rel_models, "clip")
    vlm = os.path.join(rel_models, VLM_FOLDER)
    clip_model = {"model": CLIP_MODEL, "pretrained": os.path.join(clip_dir, f"{CLIP_MODEL}.pt"),
                  "model_config": os.path.join(clip_dir, f"{CLIP_MODEL}.json")}
    steps: list[dict] = [
        {"probe": {"timeout_s": 30}},
        # the builders that read whole videos run before the cut (their samples keep the video's times)
        {"asr": {"model": os.path.join(rel_models, WHISPER_FOLDER), "batch_size": 4, "device": "cpu"}},
        {"asr_interleave": {"max_segments": 4}},
        {"video_tasks": {"seed": seed, "model": vlm, "max_new_tokens": 8, "k": 3, "n_candidates": 3,
                         "clip_s": 1.0, "shot_frames": 2, "keep_parent": True, "device": "cpu"}},
        {"clips": {"max_clip_s": 10, "scene_threshold": 0.3, "min_clip_s": 0.5}},
        {"dedup_exact": {}},
        {"leakage": {"eval_sets": [{"name": "bench", "path": "evals/bench.jsonl"}]}},
        {"dedup_near": {"threshold": 0.8}},
        {"crop_clip": {**clip_model, "device": "cpu"}},
        {"grounding": {"seed": seed}},
        {"synth_ocr": {"seed": seed, "sources": ["ocr"], "width": 448, "font_size": 20}},
        # documents and captions; the mode sources' short answers ("2") are left to repetition and
        # format_consistency (the chat profile's mean word length would drop a bare number); the ASR
        # text of the interleaved samples comes from a random model, so it is not judged as prose
        {"text_quality": {"profiles": {"conversation": None, "interleaved": None}}},
        {"clip": {**clip_model, "batch_size": 64}},
        {"vlm_judge": {"model": vlm, "batch_size": 8, "video_frames": 4}},
        {"recaption": {"model": vlm, "batch_size": 8, "max_new_tokens": 12, "video_frames": 4, "on_failure": "keep",
                       "use_asr": True}},
        {"modes": {"sources": {**MODE_SOURCES, **planted["mode_shares"]}, "emit": "both", "seed": seed,
                   "style": "report"}},
        {"repetition": {"max_score": 0.5}},
        {"format_consistency": {}},
        # last, so the counts are those of the rendered chat and the sandbox's images
        {"tokens": {"tokenizer": "tokenizer"}},
    ]
    recipe = {
        "name": "demo-full", "seed": seed,
        "sources": [{"name": "images", "format": "jsonl", "path": "images.jsonl"},
                    {"name": "videos", "format": "video_folder", "path": "videos/"},
                    {"name": "text", "format": "text", "path": "text.jsonl"}]
                   + [{"name": n, "format": "jsonl", "path": f"{n}.jsonl"} for n in mode_rows]
                   + [{"name": "coco", "format": "coco", "path": "grounding/instances_demo.json"},
                      {"name": "ocr", "format": "text", "path": "ocr.jsonl"},
                      {"name": "math", "format": "jsonl", "path": "math.jsonl"}],
        "steps": steps,
        "output": {"path": "../run", "shards": {"max_samples": 64, "max_bytes": "16MB", "shuffle": True,
                                                "prefix": "shard"}},
    }
    path = os.path.join(root, "recipe.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    log(f"  corpus ready in {time.monotonic() - t0:.1f}s: {path}")
    return path


@contextlib.contextmanager
def _quiet_builders():
    """No progress bars or "initialized randomly" warnings while the tiny models are built:
    random weights are the point here."""
    import logging

    from transformers.utils import logging as hf_logging

    root_level = logging.getLogger().level
    bars = hf_logging.is_progress_bar_enabled()
    logging.getLogger().setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.getLogger().setLevel(root_level)
        if bars:
            hf_logging.enable_progress_bar()


def without_steps(recipe_path: str, names: list[str] | tuple[str, ...]) -> None:
    """Rewrite a recipe without the steps named (the demo runs on builds that lack one)."""
    with open(recipe_path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    recipe["steps"] = [s for s in recipe["steps"] if not (isinstance(s, dict) and set(s) & set(names))]
    with open(recipe_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)


# --- where to look -----------------------------------------------------------------------------

def shard_samples(shard_dir: str) -> list[tuple[str, dict]]:
    """(shard file name, the sample's JSON) for every sample in the run's shards."""
    out = []
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(shard_dir, name)) as tf:
            for m in tf:
                if m.name.endswith(".json") and m.isfile():
                    out.append((name, json.loads(tf.extractfile(m).read())))
    return out


def _score(js: dict, name: str) -> float | None:
    """A score from the shard JSON's `scores` map (`clip`, `vlm`, `quality`), or its older field."""
    scores = js.get("scores") or {}
    for k in (name, f"{name}_score"):
        if scores.get(k) is not None:
            return scores[k]
    return js.get(f"{name}_score")


def where_to_look(run_dir: str) -> str:
    """The closing block of `reelforge demo --full`: counts and the commands that show each result."""
    import pyarrow.parquet as pq

    run_dir = os.path.abspath(run_dir)
    shard_dir = os.path.join(run_dir, "shards")
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    ledger = pq.read_table(os.path.join(run_dir, "ledger")).to_pylist()
    samples = shard_samples(shard_dir)

    def show(shard: str, js: dict) -> str:
        return f"tar -xOf {os.path.join(shard_dir, shard)} {js['id']}.json"

    def first(pred) -> tuple[str, dict] | None:
        return next(((s, js) for s, js in samples if pred(js)), None)

    def dropped(pred) -> list[dict]:
        return [r for r in ledger if r["fate"] == "dropped" and pred(r)]

    lines = [f"where to look (run: {run_dir}):",
             f"  accounting: {report['inputs']} inputs + {report['derived']} derived = {report['kept']} kept + "
             f"{report['dropped']} dropped (balanced: {report['balanced']}); per step and reason: "
             f"{os.path.join(run_dir, 'report.md')}"]
    lines.append("  per source (inputs/kept/dropped): " + ", ".join(
        f"{k} {v['inputs']}/{v['kept']}/{v['dropped']}" for k, v in report["sources"].items()))
    tasks = task_counts([js for _, js in samples])
    lines.append("  data tasks in the shards: " + ", ".join(f"{k} {v}" for k, v in tasks.items()))
    lines.append("  drops per step: " + ", ".join(
        f"{s['step']} {s['dropped']} ({', '.join(f'{r} {n}' for r, n in s['reasons'].items())})"
        for s in report["steps"] if s["dropped"]))

    def ledger_line(label: str, rows: list[dict]) -> None:
        if not rows:
            lines.append(f"  {label}: none")
            return
        by = Counter(r["source"] for r in rows)
        ex = sorted(rows, key=lambda r: r["source_key"])[0]
        lines.append(f"  {label}: {len(rows)} ({', '.join(f'{k} {v}' for k, v in sorted(by.items()))}), e.g. "
                     f"`reelforge ledger {run_dir} --key {ex['source_key']}`")

    clipped = [js for _, js in samples if (js.get("meta") or {}).get("clip")]
    ex = first(lambda js: (js.get("meta") or {}).get("clip"))
    split = dropped(lambda r: r["reason"] == "split_into_clips")
    lines.append(f"  clips: {len(split)} video cut at its scene change into {len(clipped)} clips "
                 f"(shard JSON `parent_id`, `meta.clip`)" + (f", e.g. `{show(*ex)}`" if ex else ""))
    ledger_line("exact-duplicate drops", dropped(lambda r: r["step"] == "dedup_exact"))
    ledger_line("benchmark-leak drops (reason leak:bench)", dropped(lambda r: (r["reason"] or "").startswith("leak:")))
    ledger_line("near-duplicate drops (`dup_of` names the kept one)",
                dropped(lambda r: r["reason"] == "near_duplicate"))
    if any(s["step"] == "text_quality" for s in report["steps"]):
        ledger_line("text-quality drops", dropped(lambda r: r["step"] == "text_quality"))
        n = sum(_score(js, "quality") is not None for _, js in samples)
        ex = first(lambda js: _score(js, "quality") is not None)
        lines.append(f"  text quality scores: shard JSON `scores.quality` ({n} samples)"
                     + (f", e.g. `{show(*ex)}`" if ex else ""))
    else:
        lines.append("  text quality: the text_quality step is not in this build; the recipe ran without it")
    for label, name in (("CLIP scores", "clip"), ("VLM judge scores", "vlm")):
        n = sum(_score(js, name) is not None for _, js in samples)
        ex = first(lambda js, name=name: _score(js, name) is not None)
        lines.append(f"  {label}: shard JSON `scores.{name}` ({n} samples)"
                     + (f", e.g. `{show(*ex)}`" if ex else "; not in the shard JSON of this build"))
    caps = [js for _, js in samples if js.get("captions")]
    ex = first(lambda js: js.get("captions"))
    models = sorted({c.get("model") for js in caps for c in js["captions"]})
    lines.append(f"  recaptions: shard JSON `captions` ({len(caps)} samples, model {', '.join(models) or '-'})"
                 + (f", e.g. `{show(*ex)}`" if ex else "; not in the shard JSON of this build"))
    modes = Counter(js.get("mode") for _, js in samples if js.get("mode"))
    lines.append("  modes: shard JSON `mode` and the rendered `messages`: " + ", ".join(
        f"{m} {modes.get(m, 0)}" for m in ("thinking", "non_thinking", "auto_think", "think_with_image", "video")))
    for m in ("thinking", "auto_think", "think_with_image", "video"):
        ex = first(lambda js, m=m: js.get("mode") == m)
        if ex:
            lines.append(f"    {m}: `{show(*ex)}`")
    ledger_line("repetition drops", dropped(lambda r: r["step"] == "repetition"))
    ledger_line("format-consistency drops", dropped(lambda r: r["step"] == "format_consistency"))
    tokens = report.get("tokens") or {}
    lines.append(f"  tokens: {tokens.get('tokens', 0)} kept ({tokens.get('text_tokens', 0)} text, "
                 f"{tokens.get('visual_tokens', 0)} visual), per sample in shard JSON `tokens` and "
                 f"{os.path.join(run_dir, 'samples')}/")
    return "\n".join(lines)


__all__ = ["MODE_SOURCES", "make_full_corpus", "shard_samples", "where_to_look", "without_steps"]
