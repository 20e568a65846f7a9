"""Image files for the preprocessing graph, behind :class:`onnx_mixquant.data.preprocess.ImagePreprocessor`.

:func:`_checked_bytes` reads a file, tells JPEG, PNG and BMP apart by their first bytes, and checks
the structure before onnxruntime-extensions' DecodeImage sees it: libjpeg runs there with its
default error handler, which ends the whole process on a malformed JPEG and loops forever on one
truncated in its image data, and interlaced PNGs come out scrambled. JPEG: every marker up to
end-of-image, and the frame, scan and table headers as libjpeg checks them; PNG: not interlaced;
BMP (uncompressed 8/24/32-bit) is decoded with NumPy and re-encoded as PNG. See the
:mod:`onnx_mixquant.data.preprocess` docstring for what DecodeImage decodes and how it was tested.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnx_mixquant.errors import CalibrationError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
#: Start-of-frame markers libjpeg decodes here: baseline, extended and progressive Huffman.
_JPEG_SOF_OK = (0xC0, 0xC1, 0xC2)
#: Other SOF markers (lossless, hierarchical, arithmetic coding): refused.
_JPEG_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
#: Segments allowed after SOI: SOF0-2, DHT, SOS, DQT, DRI, APP0-15, COM.
_JPEG_SEGMENTS = frozenset((*_JPEG_SOF_OK, 0xC4, 0xDA, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE))
#: End of entropy-coded data: an FF followed by neither a stuffed 00, a restart marker nor fill.
_JPEG_DATA_END = re.compile(rb"\xff(?![\x00\xd0-\xd7\xff])")
_BMP_BGRA_MASKS = bytes.fromhex("0000ff0000ff0000ff000000")  # little-endian R, G, B masks


def _checked_bytes(path: Path) -> np.ndarray:
    """The file's bytes for the graph, after the checks that keep DecodeImage from failing badly.

    Raises:
        CalibrationError: unreadable file, unknown format, or a file DecodeImage cannot decode.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"image {str(path)!r} cannot be read: {e.strerror or e}") from e
    if data.startswith(_PNG_SIGNATURE):
        problem = _png_problem(data)
    elif data.startswith(_JPEG_SOI):
        problem = _jpeg_problem(data)
    elif data.startswith(b"BM"):
        problem, data = _bmp_as_png(data)
    else:
        problem = f"not a JPEG, PNG or BMP file (it starts with {data[:8]!r})" if data else "empty file"
    if problem is not None:
        raise CalibrationError(f"image {str(path)!r} cannot be decoded: {problem}")
    return np.frombuffer(data, dtype=np.uint8)


def _png_problem(data: bytes) -> str | None:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return "truncated or corrupt PNG (no IHDR header)"
    if data[28] != 0:
        return (
            "interlaced PNG, which onnxruntime-extensions' DecodeImage reads wrongly: save it non-interlaced"
        )
    return None


@dataclass
class _JpegState:
    """What a JPEG walk has seen: frame components (id -> (quantisation table, h, v)) and tables."""

    components: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    quant: set[int] = field(default_factory=set)
    huffman: set[tuple[int, int]] = field(default_factory=set)  # (0 DC | 1 AC, table id)
    progressive: bool = False
    scans: int = 0


def _jpeg_problem(data: bytes) -> str | None:
    """Walk every JPEG marker to the end-of-image one; None when libjpeg will decode the file.

    libjpeg runs with its default error handler in DecodeImage, which ends the process on what
    this walk refuses: unknown markers (also inside the image data), broken tables, bad frame or
    scan headers, and a file that ends before its end-of-image marker (which hangs it instead).
    """
    state, pos = _JpegState(), 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return f"corrupt JPEG (no marker at byte {pos})"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return None if state.scans else "JPEG without image data"
        if marker in _JPEG_SOF_OTHER:
            return f"unsupported JPEG coding (SOF{marker - 0xC0}: lossless, hierarchical or arithmetic)"
        if marker not in _JPEG_SEGMENTS:
            return f"corrupt JPEG (unexpected marker 0x{marker:02X} at byte {pos})"
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if pos + 4 > len(data) or length < 2 or pos + 2 + length > len(data):
            return "truncated or corrupt JPEG header"
        problem = _jpeg_segment_problem(marker, data[pos + 4 : pos + 2 + length], state)
        if problem is not None:
            return problem
        pos += 2 + length
        if marker == 0xDA:  # entropy-coded data: up to the next marker that is not RSTn or a stuffed FF
            found = _JPEG_DATA_END.search(data, pos)
            pos = len(data) if found is None else found.start()
    return "truncated JPEG (it ends before its end-of-image marker)"


def _jpeg_segment_problem(marker: int, body: bytes, state: _JpegState) -> str | None:
    if marker in _JPEG_SOF_OK:
        return _jpeg_frame_problem(body, state, progressive=marker == 0xC2)
    if marker == 0xDA:
        return _jpeg_scan_problem(body, state)
    if marker == 0xDB:  # DQT: (precision << 4 | id, 64 or 128 bytes) per table
        while body:
            if body[0] >> 4 > 1 or body[0] & 15 > 3 or len(body) < 65 + 64 * (body[0] >> 4):
                return "corrupt JPEG quantisation table"
            state.quant.add(body[0] & 15)
            body = body[65 + 64 * (body[0] >> 4) :]
    if marker == 0xC4:  # DHT: (class << 4 | id, 16 counts, symbols) per table
        while body:
            counts = body[1:17]
            if len(counts) < 16 or not _huffman_ok(body[0], counts, body[17 : 17 + sum(counts)]):
                return "corrupt JPEG Huffman table"
            state.huffman.add((body[0] >> 4, body[0] & 15))
            body = body[17 + sum(counts) :]
    return None if marker != 0xDD or len(body) == 2 else "corrupt JPEG restart interval"


def _huffman_ok(kind: int, counts: bytes, symbols: bytes) -> bool:
    """libjpeg's checks: class 0/1, id 0..3, at most 256 codes that fit their lengths, DC symbols <= 15."""
    if kind >> 4 > 1 or kind & 15 > 3 or sum(counts) > 256 or len(symbols) < sum(counts):
        return False
    code = 0
    for bits, count in enumerate(counts, start=1):
        code += count
        if code >= 1 << bits and count:
            return False
        code <<= 1
    return kind >> 4 == 1 or all(s <= 15 for s in symbols)


def _jpeg_frame_problem(body: bytes, state: _JpegState, *, progressive: bool) -> str | None:
    if state.components or len(body) < 6:
        return "corrupt JPEG frame header"
    bits, height, width, ncomp = body[0], body[1:3], body[3:5], body[5]
    if bits != 8:
        return f"{bits}-bit JPEG (only 8-bit samples are supported)"
    if ncomp not in (1, 3):
        return f"JPEG with {ncomp} colour components (CMYK?): only greyscale and colour are supported"
    if not any(height) or not any(width) or len(body) != 6 + 3 * ncomp:
        return "corrupt JPEG frame header"
    h_px, w_px = int.from_bytes(height, "big"), int.from_bytes(width, "big")
    if max(h_px, w_px) > 16384 or h_px * w_px > 100 << 20:  # DecodeImage's limits, checked late
        return f"JPEG of {w_px}x{h_px} pixels: over DecodeImage's 16384 a side or 100 megapixels"
    for i in range(6, 6 + 3 * ncomp, 3):
        h, v, table = body[i + 1] >> 4, body[i + 1] & 15, body[i + 2]
        if not (1 <= h <= 4 and 1 <= v <= 4 and table <= 3) or body[i] in state.components:
            return "corrupt JPEG frame header"
        state.components[body[i]] = (table, h, v)
    max_h, max_v = (max(c[k] for c in state.components.values()) for k in (1, 2))
    if any(max_h % h or max_v % v for _, h, v in state.components.values()):  # libjpeg: fractional
        return "JPEG with unsupported (fractional) chroma subsampling"
    state.progressive = progressive
    return None


def _jpeg_scan_problem(body: bytes, state: _JpegState) -> str | None:
    n = body[0] if body else 0
    if not state.components or not 1 <= n <= len(state.components) or len(body) != 4 + 2 * n:
        return "corrupt JPEG scan header"
    start, end, high, low = body[1 + 2 * n], body[2 + 2 * n], body[3 + 2 * n] >> 4, body[3 + 2 * n] & 15
    if state.progressive:
        bad = end > 63 or start > end or (start == 0) != (end == 0) or (start > 0 and n != 1)
        bad = bad or low > 13 or (high != 0 and low != high - 1)
    else:
        bad = (start, end, high, low) != (0, 63, 0, 0)
    if bad:
        return f"corrupt JPEG scan header (Ss={start} Se={end} Ah={high} Al={low})"
    comps = [state.components.get(body[i]) for i in range(1, 1 + 2 * n, 2)]
    if any(c is None or c[0] not in state.quant for c in comps):
        return "corrupt JPEG (a scan uses an undefined component or quantisation table)"
    if n > 1 and sum(c[1] * c[2] for c in comps if c is not None) > 10:
        return "corrupt JPEG (sampling factors too large for an interleaved scan)"
    for i in range(1, 1 + 2 * n, 2):
        dc, ac = body[i + 1] >> 4, body[i + 1] & 15
        needed = [(0, dc)] * (start == 0 and high == 0) + [(1, ac)] * (end > 0)
        if any(t > 1 and (k, t) not in state.huffman for k, t in needed):  # libjpeg has tables 0 and 1
            return "corrupt JPEG (a scan uses an undefined Huffman table)"
    state.scans += 1
    return None


def _bmp_as_png(data: bytes) -> tuple[str | None, bytes]:
    """(problem, PNG bytes) for an uncompressed 8-bit (palette), 24-bit or 32-bit BMP."""
    if len(data) < 54 or int.from_bytes(data[14:18], "little") < 40:
        return "truncated BMP, or an OS/2 BMP (not supported)", data
    offset, header = int.from_bytes(data[10:14], "little"), int.from_bytes(data[14:18], "little")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)
    bits, compression = int.from_bytes(data[28:30], "little"), int.from_bytes(data[30:34], "little")
    plain = compression == 0 or (compression == 3 and bits == 32 and data[54:66] == _BMP_BGRA_MASKS)
    if bits not in (8, 24, 32) or not plain:
        return f"BMP with {bits}-bit pixels and compression {compression} is not supported", data
    rows, stride = abs(height), (bits * width + 31) // 32 * 4
    if width <= 0 or rows == 0 or offset + stride * rows > len(data):
        return "truncated or corrupt BMP", data
    raw = np.frombuffer(data, np.uint8, stride * rows, offset).reshape(rows, stride)
    if bits == 8:
        ncolours = int.from_bytes(data[46:50], "little") or 256
        if ncolours > 256 or 14 + header + 4 * ncolours > len(data):
            return "corrupt BMP palette", data
        palette = np.frombuffer(data, np.uint8, 4 * ncolours, 14 + header).reshape(ncolours, 4)
        bgr = palette[np.minimum(raw[:, :width], ncolours - 1), :3]
    else:
        bgr = raw[:, : width * bits // 8].reshape(rows, width, bits // 8)[..., :3]
    rgb = bgr[::-1, :, ::-1] if height > 0 else bgr[:, :, ::-1]  # height > 0: rows stored bottom-up
    return None, _png_bytes(np.ascontiguousarray(rgb))


def _png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> an 8-bit RGB PNG (no row filters)."""
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    body = zlib.compress(rows.tobytes(), 1)
    return _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
