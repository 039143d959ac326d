"""An image's width and height read from its file header, before anything is decoded (stdlib only).

Decoding first and checking afterwards is too late: a 2.6 MB PNG can declare 30000 x 30000 pixels and make OpenCV
allocate gigabytes (a decompression bomb). OpenCV has no public header-only probe in Python, and Pillow would be a
new dependency for ~60 lines of well-specified header fields, so the common formats are parsed here.
Unknown or damaged headers give None; the decoder then reports the file as it would anyway.
"""

from __future__ import annotations

import struct

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: larger than any industrial camera frame, far below a bomb's gigabytes

# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not SOFs.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png(b: bytes) -> tuple[int, int] | None:
    if len(b) >= 24 and b[12:16] == b"IHDR":
        return struct.unpack(">II", b[16:24])
    return None


def _jpeg(b: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", b[i + 2 : i + 4])
        if marker in _SOF:
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def _bmp(b: bytes) -> tuple[int, int] | None:
    if len(b) < 26:
        return None
    if struct.unpack("<I", b[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", b[18:22])
    w, h = struct.unpack("<ii", b[18:26])
    return abs(w), abs(h)  # a negative height means top-down rows


def _tiff(b: bytes) -> tuple[int, int] | None:
    end = "<" if b[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack(end + "I", b[4:8])
        (count,) = struct.unpack(end + "H", b[offset : offset + 2])
        size: dict[int, int] = {}
        for k in range(count):
            e = offset + 2 + 12 * k
            tag, kind = struct.unpack(end + "HH", b[e : e + 4])
            if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
                size[tag] = struct.unpack(end + ("H" if kind == 3 else "I"), b[e + 8 : e + (10 if kind == 3 else 12)])[
                    0
                ]
        return (size[256], size[257]) if len(size) == 2 else None
    except (struct.error, KeyError):
        return None


def _webp(b: bytes) -> tuple[int, int] | None:
    chunk = b[12:16]
    if chunk == b"VP8X" and len(b) >= 30:
        return 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little")
    if chunk == b"VP8L" and len(b) >= 25:
        bits = int.from_bytes(b[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(b) >= 30:
        w, h = struct.unpack("<HH", b[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _pnm(b: bytes) -> tuple[int, int] | None:
    fields: list[int] = []
    for line in b[2:512].split(b"\n"):
        for tok in line.split(b"#")[0].split():
            if not tok.isdigit():
                return None
            fields.append(int(tok))
            if len(fields) == 2:
                return fields[0], fields[1]
    return None


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) declared by the header at the start of an encoded image, or None when it is not known."""
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            return _png(head)
        if head[:2] == b"\xff\xd8":
            return _jpeg(head)
        if head[:2] == b"BM":
            return _bmp(head)
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff(head)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:1] == b"P" and head[1:2] in b"123456":
            return _pnm(head)
    except struct.error:
        return None
    return None


def pixel_limit_error(head: bytes, name: str, max_pixels: int | None) -> str | None:
    """The error sentence when the header declares more than `max_pixels` pixels (None: no limit), else None."""
    if not max_pixels:
        return None
    size = image_size(head)
    if size is None or size[0] * size[1] <= max_pixels:
        return None
    w, h = size
    return (
        f"{name} declares {w}x{h} pixels ({w * h / 1e6:.0f} MP), more than the limit of {max_pixels / 1e6:g} MP "
        "(a decompression bomb or a wrong file); raise --max-pixels if the image is genuine"
    )
