"""Which 64 KiB grains of a device a temporary overlay holds (the `--snapshot` overlay,
qnbd/block/overlay.py, and a checkpoint's view, qnbd/block/cbw.py): one byte a grain,
kept only for the regions where some grain is held.

A flat map would be sized by what the image claims: a few kilobytes of qcow2 may claim
2 PiB, 32 GiB of map made at open or at a checkpoint. Here memory follows what was
written (a chunk of CHUNK bytes per region of CHUNK grains touched, under 1% of the data
the overlay file then holds), and the searches skip untouched regions whole.
"""

GRAIN = 64 * 1024
# Grains per chunk of the map: 512 bytes of map cover 32 MiB of device.
CHUNK_BITS = 9
CHUNK = 1 << CHUNK_BITS
_MASK = CHUNK - 1
_ONES = b"\x01" * CHUNK


class GrainMap:
    def __init__(self, size: int):
        self.grains = -(-size // GRAIN)
        self.chunks: dict[int, bytearray] = {}

    def __getitem__(self, g: int) -> int:
        chunk = self.chunks.get(g >> CHUNK_BITS)
        return chunk[g & _MASK] if chunk is not None else 0

    def set(self, first: int, stop: int) -> None:
        """Mark grains [first, stop) as held."""
        for c, g, base, end in _pieces(first, stop):
            chunk = self.chunks.get(c)
            if chunk is None:
                chunk = self.chunks[c] = bytearray(CHUNK)
            chunk[g - base:end - base] = _ONES[:end - g]

    def first_clear(self, first: int, stop: int) -> int:
        """The first grain of [first, stop) not held, or -1."""
        return self._find(first, stop, 0)

    def run_end(self, g: int, last: int) -> int:
        """The first grain after g, at most last + 1, whose state differs from g's."""
        return self._find(g + 1, last + 1, 0 if self[g] else 1, last + 1)

    def _find(self, first: int, stop: int, value: int, none: int = -1) -> int:
        for c, g, base, end in _pieces(first, stop):
            chunk = self.chunks.get(c)
            if chunk is None:
                if value == 0:
                    return g
            else:
                i = chunk.find(value, g - base, end - base)
                if i >= 0:
                    return base + i
        return none


def _pieces(g: int, stop: int):
    """Grains [g, stop) split at chunk boundaries: (chunk index, first grain, the chunk's
    first grain, end grain) of each piece."""
    while g < stop:
        c = g >> CHUNK_BITS
        base = c << CHUNK_BITS
        end = min(base + CHUNK, stop)
        yield c, g, base, end
        g = end
