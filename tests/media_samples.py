"""Images for the multimodal tests: good ones, and the bad ones of issue 27."""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image


def b64(image: Image.Image, fmt: str = "PNG", **save: object) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_with(width: int, height: int, idat: bytes) -> str:
    """A PNG whose chunks are well formed (valid CRCs) around `idat`."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
    return base64.b64encode(raw + _chunk(b"IEND", b"")).decode()


def garbage_idat_png() -> str:
    """Issue 27's first defect: served as a black picture, since `verify()`
    checks chunk CRCs and decodes no pixel."""
    return png_with(16, 16, b"this is not zlib data at all")


def truncated_jpeg(keep: float = 0.6) -> str:
    """The first `keep` of a JPEG (issue 27's "image file is truncated")."""
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    full = base64.b64decode(b64(noise, "JPEG"))
    return base64.b64encode(full[: int(len(full) * keep)]).decode()


def half_transparent() -> Image.Image:
    """Half-transparent red with one fully transparent black pixel: dropping
    alpha gives red and black, compositing onto white pink and white."""
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    img.putpixel((0, 0), (0, 0, 0, 0))
    return img


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with structure at every scale (so resizing keeps it distinct)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x ^ y) & 255], -1)
    pixels = (pixels + rng.integers(0, 64, pixels.shape)) % 256
    return Image.fromarray(pixels.astype("uint8"))


def mp4(frames: int = 8, size: int = 112, seed: int = 0) -> str:
    """A small MPEG-4 video of random frames (OpenCV, a vLLM dependency), base64."""
    import os
    import tempfile

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (size, size))
        for _ in range(frames):
            writer.write(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        writer.release()
        with open(path, "rb") as f:
            return base64.b64encode(f.read()).decode()
    finally:
        os.unlink(path)
