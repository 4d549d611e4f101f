"""What a JPEG's header says, read from its bytes without decoding it (nor importing
Pillow's decoder): size, colour components, EXIF orientation, and whether the file ends
with an end-of-image marker. GPU decoding (tlearn.runtime.gpu_decode) uses it to send to
nvJPEG only the files Pillow would decode the same way, and everything else to the CPU
path, which reports problems exactly as it always does."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Start-of-frame markers (SOF0..SOF15 except DHT, JPG and DAC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length field
_TAIL = 64  # an end-of-image marker may be followed by a little padding


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK
    sof: int  # the frame marker: 0xC0 baseline, 0xC2 progressive, ...
    orientation: int  # EXIF orientation 1..8 (1 when absent, -1 when it cannot be told)
    complete: bool  # an end-of-image marker near the end of the file


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG file's bytes, or None when they are not a JPEG whose frame
    header could be found."""
    if not is_jpeg(data):
        return None
    pos, n = 2, len(data)
    orientation, xmp_orientation = None, False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or start of scan before any frame
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > n:
            return None
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and orientation is None:
            orientation = exif_orientation(segment[6:])
        elif marker == 0xE1 and segment.startswith(b"http://ns.adobe.com/xap/"):
            xmp_orientation = b"Orientation" in segment  # Pillow reads XMP's too
        elif marker in _SOF:
            if len(segment) < 6:
                return None
            height, width = struct.unpack(">HH", segment[1:5])
            complete = b"\xff\xd9" in data[-_TAIL:]
            if orientation is None:
                orientation = -1 if xmp_orientation else 1
            return JpegHeader(width, height, segment[5], marker, orientation, complete)
        pos += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of an EXIF block (TIFF): 1..8, 1 when the
    block has none, -1 when the block cannot be read the plain way."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return -1
    end = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", tiff[4:8])
        (count,) = struct.unpack(end + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind, _ = struct.unpack(end + "HHI", entry[:8])
            if tag == 0x0112:
                if kind != 3:  # not a SHORT
                    return -1
                (value,) = struct.unpack(end + "H", entry[8:10])
                return value if 1 <= value <= 8 else -1
    except struct.error:
        return -1
    return 1
