"""The bytes of a corpus file: plain, gzip or zstd (frame after frame, a truncated frame refused)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import zstandard

ZSTD_INPUT_BYTES = 1 << 16  # compressed bytes decompressed at a time (bounds each output burst)


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a zstd file, frame after frame; EOFError if the file ends inside a
    frame (zstandard's stream_reader would silently return the truncated data)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115 (the reader owns it; close() closes it)
        self._decompressor = zstandard.ZstdDecompressor()
        # The decompression object of the frame being read (the stubs name its class, the C
        # backend does not export it: the annotation is only read by type checkers).
        self._frame: zstandard.ZstdDecompressionObj | None = None
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            data = b""
            if self._frame is not None and self._frame.eof:
                data, self._frame = self._frame.unused_data, None
            data = data or self._file.read(ZSTD_INPUT_BYTES)
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            self._output = memoryview(self._frame.decompress(data))
        count = min(len(buffer), len(self._output))
        buffer[:count] = self._output[:count]
        self._output = self._output[count:]
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: Path, compression: str | None) -> io.BufferedIOBase:
    """The file's bytes, decompressed as its name says (``compression``: gzip, zstd or None)."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open(path, "rb")
