"""64-bit perceptual hashes (DCT pHash) of images and video frames, for near-dup and leakage.

The hash is the sign pattern of the lowest 8x8 DCT coefficients of a 32x32 greyscale
thumbnail against their median, as in `imagehash.phash`. It is stored as a signed int64
(Spark has no unsigned long); Hamming distance works the same on the bit pattern.
"""

from __future__ import annotations

import numpy as np

_N = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_D = _dct_matrix(_N)
_BITS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash_gray32(gray: np.ndarray) -> int:
    """pHash of a 32x32 greyscale array (float or uint8)."""
    coeffs = _D @ gray.astype(np.float64) @ _D.T
    low = coeffs[:8, :8].ravel()
    bits = (low > np.median(low)).astype(np.uint64)
    value = int((bits * _BITS).sum(dtype=np.uint64))
    return value - (1 << 64) if value >= 1 << 63 else value


def phash_image(img) -> int:
    """pHash of a PIL image (any mode, any size)."""
    from PIL import Image

    small = img.convert("L").resize((_N, _N), Image.Resampling.LANCZOS)
    return phash_gray32(np.asarray(small))


def phash_rgb(frame: np.ndarray) -> int:
    """pHash of an HxWx3 uint8 RGB frame (as decoded from video)."""
    from PIL import Image

    return phash_image(Image.fromarray(frame))


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")
