"""Write load over NBD for the SIGKILL tests: random writes and flushes through libnbd,
recording in `state` what was acknowledged (model), what the last completed flush made
durable (flushed) and which sectors were written since (touched)."""

import signal
import threading
import time

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


def new_state(content: bytes) -> dict:
    """What write_load records, starting from an image that reads as content."""
    return {"model": bytearray(content), "flushed": content,
            "touched": bytearray(len(content) // SECTOR)}


def kill_during_writes(server, rng, state, size) -> None:
    """Write through a running server from another thread and SIGKILL it 0.2-0.8 s in:
    the kill lands at a random point of the write path, not at a request boundary."""
    stop = threading.Event()
    t = threading.Thread(target=write_load, args=(server.uri, rng, state, stop, size))
    t.start()
    try:
        time.sleep(rng.uniform(0.2, 0.8))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        stop.set()
        t.join()


def lost_flushed_sector(content: bytes, state) -> int | None:
    """The offset of the first sector that the last completed flush made durable, that no
    later write touched, and that now reads otherwise; None when there is none."""
    for sector, touched in enumerate(state["touched"]):
        lo = sector * SECTOR
        if not touched and content[lo:lo + SECTOR] != state["flushed"][lo:lo + SECTOR]:
            return lo
    return None
