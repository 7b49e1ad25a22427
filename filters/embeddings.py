"""The embeddings a CLIP step keeps (`clip: {keep_embeddings: true}`), and how to read them back.

Where: beside the run, never in the shards: `RUN/embeddings/<step name>/`, a Parquet folder
(zstd) written by Spark (a `_SUCCESS` file says it is complete). A re-run that runs the step
again overwrites the folder; a run of the step without `keep_embeddings` removes it; a run
whose recipe no longer keeps a step's embeddings (or whose step must run again) removes them
before the first step starts, so what lies there is always the product of this recipe's step.

One row per medium of each sample the step embedded (every sample it scored, kept or dropped
by its threshold afterwards):

    id      string   the sample's id
    index   int32    the medium's position in the sample's `media` (0: the first)
    image   binary   the medium's L2-normalised image embedding, float16 little-endian; a video's
                     is the L2-normalised mean of its sampled frames' (normalised) embeddings
    text    binary   the sample's text embedding (the caption the step scored), the same bytes
                     on every row of the sample
    text_hash string `text_hash` of that caption (blake2b-64, hex): a reader that wants the
                     embedding of some text of the sample (`leakage` embeds every turn of a
                     conversation, the CLIP step by default its assistant turns) reuses it only
                     when the hashes agree, so a different or since rewritten text is embedded again
    model   string   the open_clip fields that made them, as compact JSON
                     ({"model", "pretrained", "model_config"}): `model_fields` reads it back
    dim     int32    the embedding width

A single-medium sample has one row (index 0); steps that want one vector per sample
(`dedup_semantic`) read index 0, the first medium. Readers: `read_embeddings` (numpy),
`read_embedding_table` (every row, Arrow); the Spark side is `jobs.semantic.embeddings_frame`
(one medium) and `jobs.semantic.kept_embeddings` (the folder a `from_step` names, checked).
A reader reuses them only for the same model: `same_model` compares the `model` column with
its own open_clip fields (paths compared as real paths).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa

FOLDER = "embeddings"  # under the run's output folder
DTYPE = np.dtype("<f2")
TABLE_SCHEMA = pa.schema([("id", pa.string()), ("index", pa.int32()), ("image", pa.binary()),
                          ("text", pa.binary()), ("text_hash", pa.string()), ("model", pa.string()),
                          ("dim", pa.int32())])
# what a CLIP step hands the engine per sample, under the row key below (the engine adds model and dim)
ROW_KEY = "_embeddings"
ROW_TYPE = pa.list_(pa.struct([("index", pa.int32()), ("image", pa.binary()), ("text", pa.binary())]))


def embeddings_folder(run_dir: str, step_name: str) -> str:
    """`RUN/embeddings/<step name>`: where the step `step_name` keeps its embeddings."""
    return os.path.join(run_dir, FOLDER, step_name)


def complete(folder: str) -> bool:
    """Whether a Spark write of the folder finished (its `_SUCCESS` marker is there)."""
    return os.path.isfile(os.path.join(folder, "_SUCCESS"))


def model_tag(model: str, pretrained: str | None, model_config: str | None) -> str:
    """The `model` column: the open_clip fields as compact JSON with sorted keys."""
    return json.dumps({"model": model, "pretrained": pretrained or "", "model_config": model_config or ""},
                      sort_keys=True, separators=(",", ":"))


def model_fields(tag: str) -> dict:
    """{"model", "pretrained", "model_config"} from a `model` column value."""
    d = json.loads(tag)
    return {"model": d["model"], "pretrained": d.get("pretrained") or "", "model_config": d.get("model_config") or ""}


def _where(value: str) -> str:
    """A path as its real path (symlinks and `..` resolved); a tag or name that is no file, as given."""
    return os.path.realpath(value) if value and os.path.exists(value) else value


def same_model(tag: str, model: str, pretrained: str | None, model_config: str | None) -> bool:
    """Whether the embeddings of `model` column value `tag` were made by these open_clip fields:
    the same architecture name, and the same checkpoint (a tag, or a file at the same real
    path) and model config."""
    try:
        f = model_fields(tag)
    except (ValueError, KeyError, TypeError):
        return False
    return (f["model"] == model and _where(f["pretrained"]) == _where(pretrained or "")
            and _where(f["model_config"]) == _where(model_config or ""))


def text_hash(text: str) -> str:
    """The `text_hash` column: blake2b-64 (hex) of the text a text embedding is of."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def to_bytes(v: np.ndarray) -> bytes:
    """One embedding as float16 little-endian bytes."""
    return np.asarray(v, dtype=np.float32).astype(DTYPE).tobytes()


def from_bytes(b: bytes) -> np.ndarray:
    """float32 vector from float16 little-endian bytes."""
    return np.frombuffer(b, dtype=DTYPE).astype(np.float32)


def matrix(values: list[bytes | None], dim: int) -> np.ndarray:
    """An (n, dim) float32 matrix from a list of float16 byte strings (a None is a row of NaN)."""
    out = np.full((len(values), dim), np.nan, dtype=np.float32)
    ok = [i for i, v in enumerate(values) if v is not None]
    if ok:
        flat = np.frombuffer(b"".join(values[i] for i in ok), dtype=DTYPE)
        if flat.size != len(ok) * dim:
            raise ValueError(f"embeddings of {flat.size // max(1, len(ok))} values, expected {dim}")
        out[ok] = flat.reshape(len(ok), dim)
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1)


def medium_embeddings(frame_emb: np.ndarray, counts: list[int]) -> np.ndarray:
    """One normalised embedding per medium from its frames' embeddings (`counts[j]` rows each,
    in order): a single frame (an image) is itself, a video the normalised mean of its frames."""
    out, pos = [], 0
    for n in counts:
        out.append(normalise(frame_emb[pos:pos + n].mean(0)) if n > 1 else frame_emb[pos])
        pos += n
    return np.stack(out) if out else np.zeros((0, frame_emb.shape[-1]), dtype=np.float32)


def row_entries(media_emb: np.ndarray, text_emb: np.ndarray) -> list[dict]:
    """What a CLIP step puts under `ROW_KEY` on a scored row: one entry per medium."""
    t = to_bytes(text_emb)
    return [{"index": j, "image": to_bytes(v), "text": t} for j, v in enumerate(media_emb)]


def read_embedding_table(folder: str) -> pa.Table:
    """Every row of a kept-embeddings folder, in the order of its files (Arrow table)."""
    import pyarrow.dataset as ds

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no embeddings at {folder}: run the CLIP step with keep_embeddings: true")
    return ds.dataset(folder, format="parquet", exclude_invalid_files=True,
                      ignore_prefixes=["_", "."]).to_table()


def read_embeddings(folder: str, index: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, image matrix, text matrix), float32, one row per sample, sorted by id: each sample's
    medium `index` (0: its first). Rows are unit vectors up to float16 rounding."""
    t = read_embedding_table(folder)
    rows = [r for r in t.select(["id", "index", "image", "text", "dim"]).to_pylist() if r["index"] == index]
    rows.sort(key=lambda r: r["id"])
    if not rows:
        return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    dim = rows[0]["dim"]
    return ([r["id"] for r in rows], matrix([r["image"] for r in rows], dim),
            matrix([r["text"] for r in rows], dim))
