"""Where each sample sits inside a shard tar: (key, offset, length) of its members' bytes.

A sample's members are written one after another (header + data padded to 512 bytes
each), so the whole sample is one contiguous byte span. Knowing the span lets the mixer
copy a sample into a new shard with one read and one write, without parsing it, and the
copy is byte-for-byte what the tar writer would produce for the same members.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterator

BLOCK = 512


class TarSpanError(Exception):
    """A shard that is not a plain ustar/pax tar the project wrote."""


def _octal(field: bytes) -> int:
    s = field.rstrip(b"\0 ").strip()
    if not s:
        return 0
    if s[0] & 0x80:  # base-256 for huge sizes (GNU extension)
        return int.from_bytes(field[1:], "big")
    return int(s, 8)


def key_of(name: str) -> str:
    """webdataset's rule: the key is the member's name up to the first dot of its basename."""
    d, _, base = name.rpartition("/")
    k = base.split(".", 1)[0]
    return f"{d}/{k}" if d else k


def scan_spans(path: str) -> Iterator[tuple[str, int, int]]:
    """(key, offset, length) of every sample in the tar at `path`, in file order.

    Only headers are read (through mmap, so big media pages are never touched)."""
    size = os.path.getsize(path)
    if size == 0:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0
        cur_key: str | None = None
        cur_start = 0
        member_start: int | None = None  # where the current member's first (pax/long-name) header began
        pending_name: str | None = None
        while pos + BLOCK <= size:
            hdr = mm[pos:pos + BLOCK]
            if hdr == b"\0" * BLOCK:
                break
            if member_start is None:
                member_start = pos
            typeflag = hdr[156:157]
            n = _octal(hdr[124:136])
            data_end = pos + BLOCK + ((n + BLOCK - 1) // BLOCK) * BLOCK
            if typeflag in (b"x", b"L"):  # a pax or GNU long-name header: the real name follows
                body = mm[pos + BLOCK:pos + BLOCK + n]
                if typeflag == b"L":
                    pending_name = body.rstrip(b"\0").decode("utf-8", "surrogateescape")
                else:
                    for rec in body.split(b"\n"):
                        if b" path=" in rec:
                            pending_name = rec.split(b" path=", 1)[1].decode("utf-8", "surrogateescape")
                pos = data_end
                continue
            if pending_name is not None:
                name, pending_name = pending_name, None
            else:
                name = hdr[0:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
                prefix = hdr[345:500].rstrip(b"\0")
                if hdr[257:262] == b"ustar" and prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            k = key_of(name)
            if k != cur_key:
                if cur_key is not None:
                    yield cur_key, cur_start, member_start - cur_start
                cur_key, cur_start = k, member_start
            member_start = None
            pos = data_end
        if pos > size:
            raise TarSpanError(f"{path} is cut short")
        if cur_key is not None:
            yield cur_key, cur_start, pos - cur_start


def split_members(span: bytes) -> list[tuple[str, bytes]]:
    """(name, data) of each member of a sample's span (plain headers, as the project writes)."""
    out = []
    pos = 0
    while pos + BLOCK <= len(span):
        hdr = span[pos:pos + BLOCK]
        n = _octal(hdr[124:136])
        name = hdr[0:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        out.append((name, bytes(span[pos + BLOCK:pos + BLOCK + n])))
        pos += BLOCK + ((n + BLOCK - 1) // BLOCK) * BLOCK
    return out
