"""Write load over NBD for the SIGKILL tests: random writes and flushes through libnbd,
recording in `state` what was acknowledged (model), what the last completed flush made
durable (flushed) and which sectors were written since (touched)."""

import nbd

SECTOR = 512


def write_load(uri, rng, state, stop, size):
    """Random writes with a flush now and then, recording what is acknowledged."""
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        while not stop.is_set():
            if rng.random() < 0.1:
                h.flush()
                state["flushed"] = bytes(state["model"])
                state["touched"] = bytearray(size // SECTOR)
                continue
            n = rng.choice([512, 4096, 65536, 200000])
            off = rng.randrange(0, size - n) // SECTOR * SECTOR
            data = bytes([rng.randrange(1, 256)]) * n
            first, last = off // SECTOR, (off + n - 1) // SECTOR
            state["touched"][first:last + 1] = b"\1" * (last - first + 1)
            h.pwrite(data, off)
            state["model"][off:off + n] = data
    except nbd.Error:
        pass  # the server was killed under us
