"""Compression and decompression of compressed clusters (qcow2.rst, "compression_type").

Deflate clusters are raw deflate streams without zlib headers; zstd clusters are one zstd
frame. Both may be followed by unrelated bytes (the next cluster's data can share the last
sector), so decoding stops once a cluster's worth of output is produced.
"""

import io
import zlib

import zstandard

from ..errors import IOFailure
from .header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    try:
        if compression_type == COMPRESSION_DEFLATE:
            # wbits -15: raw deflate with the largest window, which decodes any window size.
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(cluster_size)
        else:
            raise IOFailure(f"unknown compression type {compression_type}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise IOFailure(f"compressed cluster is damaged: {e}") from None
    if len(out) != cluster_size:
        raise IOFailure("compressed cluster is damaged: it decompresses to "
                        f"{len(out)} bytes instead of {cluster_size}")
    return out


def compress(data: bytes, compression_type: int) -> bytes | None:
    """One cluster compressed as qemu's qcow2-threads.c does it, or None when that saves
    nothing: qemu then writes the cluster uncompressed (qcow2_co_compress with a
    destination of cluster_size - 1 bytes)."""
    if compression_type == COMPRESSION_DEFLATE:
        # qcow2_compress: raw deflate, default level, 4 KiB window (-12), memLevel 9.
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    elif compression_type == COMPRESSION_ZSTD:
        out = zstandard.ZstdCompressor().compress(data)  # default level, one frame
    else:
        raise IOFailure(f"unknown compression type {compression_type}")
    return out if len(out) < len(data) else None
