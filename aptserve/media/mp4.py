"""MP4 box parsing: top-level boxes of a complete file, the appendable pieces of a fragmented stream (init segment,
then moof+mdat fragments), and the RFC 6381 codec string of an H.264 init segment. Stdlib only."""

from __future__ import annotations

from collections.abc import Iterator

# Top-level boxes that end an appendable piece: the init segment ends with moov, a fragment with mdat.
_PIECE_ENDS = (b"moov", b"mdat")


def _box_size(buf: bytes | bytearray, pos: int) -> int | None:
    """Size of the box starting at `pos`, or None while its header is incomplete."""
    if len(buf) - pos < 8:
        return None
    size = int.from_bytes(buf[pos : pos + 4], "big")
    header = 8
    if size == 1:  # 64-bit "largesize" follows the type
        if len(buf) - pos < 16:
            return None
        size, header = int.from_bytes(buf[pos + 8 : pos + 16], "big"), 16
    if size < header:  # 0 ("to end of file") never occurs in ffmpeg's fragmented output
        raise ValueError(f"bad MP4 box size {size} at offset {pos}")
    return size


def iter_boxes(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Yield (type, whole box bytes) for each top-level box of a complete MP4 buffer."""
    pos = 0
    while pos < len(data):
        size = _box_size(data, pos)
        if size is None or pos + size > len(data):
            raise ValueError(f"MP4 data ends inside a box at offset {pos} ({len(data) - pos} bytes left)")
        yield data[pos + 4 : pos + 8].decode("latin-1"), data[pos : pos + size]
        pos += size


def codec_string(init_segment: bytes) -> str:
    """RFC 6381 codec of an H.264 init segment, e.g. 'avc1.42C01F' (baseline, level 3.1), read from its avcC box."""
    at = init_segment.find(b"avcC")
    if at < 0:
        raise ValueError("no avcC box: not an H.264 init segment")
    profile, compat, level = init_segment[at + 5 : at + 8]  # after the type: version, profile, compat, level
    return f"avc1.{profile:02X}{compat:02X}{level:02X}"


class BoxSplitter:
    """Cuts an MP4 byte stream into appendable pieces: the init segment, then whole fragments (moof+mdat)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # end of the last whole box in _buf

    def feed(self, data: bytes) -> list[bytes]:
        """Add stream bytes; return the pieces they complete."""
        self._buf += data
        pieces = []
        while (size := _box_size(self._buf, self._scanned)) is not None and self._scanned + size <= len(self._buf):
            kind = bytes(self._buf[self._scanned + 4 : self._scanned + 8])
            self._scanned += size
            if kind in _PIECE_ENDS:
                pieces.append(bytes(self._buf[: self._scanned]))
                del self._buf[: self._scanned]
                self._scanned = 0
        return pieces

    def finish(self) -> list[bytes]:
        """End of stream: whole boxes left over (a trailer, say) form a last piece; a partial box is an error."""
        if self._scanned != len(self._buf):
            raise ValueError(f"MP4 stream ends inside a box ({len(self._buf) - self._scanned} bytes left)")
        rest = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return [rest] if rest else []
