"""Running a workload on the recording seam and checking every enumerated crash state
against qemu-img (used by test_crash.py and test_crash_mutation.py)."""

import json
import os
import random
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import qnbd.fileio
from qnbd.errors import QnbdError
from qnbd.formats import open_image, probe

from bitmaputil import qemu_dirty_map
from crashsim import SECTOR, Recorder, crash_states
from peers import run
from qcow2util import INCOMPAT_DIRTY, patch_bytes, patch_fields, read_field, read_u64
from images import MiB, Shape
from qedimages import QedShape
from workload import Model, apply_ops, converted, discard_unit

# The shapes the engine issue asks for: small refcount regions (512 B clusters, 64-bit
# refcounts: 64 clusters a block) under raw and qcow2 backing files, 1-bit refcounts,
# v2, lazy refcounts, compressed clusters, persistent bitmaps, extended L2 entries.
SHAPES = [
    Shape("c512-r64-raw", "cluster_size=512,refcount_bits=64", backing="raw", size=4 * MiB),
    Shape("c512-r64-qcow2", "cluster_size=512,refcount_bits=64", backing="qcow2",
          size=4 * MiB),
    Shape("c4k-r1", "cluster_size=4096,refcount_bits=1", size=4 * MiB),
    Shape("v2", "compat=0.10", size=4 * MiB),
    Shape("lazy", "lazy_refcounts=on", size=4 * MiB),
    Shape("zlib", compress="zlib", size=4 * MiB),
    Shape("bitmaps", "cluster_size=4096", size=4 * MiB, bitmaps=["b0", "b1"]),
    # Extended L2 entries, 16 KiB clusters: 512-byte subclusters, each write's partial
    # subclusters copied on write; over a qcow2 backing file; and compressed clusters.
    Shape("extl2-c16k", "extended_l2=on,cluster_size=16k", size=4 * MiB),
    Shape("extl2-c16k-qcow2", "extended_l2=on,cluster_size=16k", backing="qcow2",
          size=4 * MiB),
    Shape("extl2-zlib", "extended_l2=on,cluster_size=16k", compress="zlib", size=4 * MiB),
]
SHAPE_IDS = [s.name for s in SHAPES]
# QED (rule 12): small clusters and several L2 tables; raw and QED backing files.
QED_SHAPES = [
    QedShape("qed-c4k", "cluster_size=4096,table_size=2", size=8 * MiB),
    QedShape("qed-raw", "cluster_size=4096", backing="raw", size=8 * MiB),
    QedShape("qed-qed", backing="qed", size=8 * MiB),
]


@dataclass
class Context:
    flushed: bytes  # the guest content at the last completed flush
    touched: bytes  # one byte per sector: written since that flush
    during: str  # the operation under way, for failure messages
    start: bytes = b""  # the guest content when the image was opened
    # Snapshot operations: the states a crash may show, each (snapshot ids, active
    # content, {snapshot id: its content}); empty for guest workloads.
    outcomes: tuple = ()


def crash_ops(rng: random.Random, size: int, count: int) -> list:
    """Writes, zeroes (with and without trim), discards and flushes, a few sectors to a
    few clusters long, some aligned: each one allocates, frees or rewrites metadata."""
    ops = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "write", "zero", "zero_trim", "discard",
                           "flush"])
        off = rng.randrange(0, size)
        if rng.random() < 0.4:
            off = off // 65536 * 65536
        n = rng.choice([1, 511, 512, 4096, 65536, 70000, rng.randrange(1, 140000)])
        ops.append((kind, off, max(1, min(n, size - off)), rng.randrange(1, 256)))
    return ops


def record_workload(shape: Shape, directory, ops, monkeypatch):
    """Run `ops` on a fresh image of `shape`, recording every interval; returns the
    image path and the intervals, each with its Context."""
    return record_driven(shape, directory, monkeypatch,
                         lambda dev, do: [do(op) for op in ops])


def record_driven(shape, directory, monkeypatch, drive):
    """drive(dev, do) runs the workload, calling do(op) for each operation (qcow2
    shapes of images.py, QED shapes of qedimages.py)."""
    return record_on(shape.build(directory), directory, monkeypatch, drive,
                     discard_keeps=getattr(shape, "v2", False) and shape.backing is not None)


def record_on(image: str, directory, monkeypatch, drive, discard_keeps=False,
              outcomes=(), pooled: random.Random | None = None, failing: float = 0.0):
    """record_driven on an image already made (opening it may itself write: a repair).
    outcomes: what a snapshot operation may leave (Context.outcomes). pooled: WRITEs go
    through write plans as the server's WritePool runs them (_PooledWrites), `failing`
    of them failing part-way (aborted)."""
    fmt = probe(image)
    start = converted(image, fmt, directory)
    state = {"flushed": bytes(start), "touched": bytearray(len(start) // SECTOR + 1),
             "op": "open"}
    intervals = []

    def closed(recorder: Recorder):
        intervals.append(recorder.interval(Context(state["flushed"], bytes(state["touched"]),
                                                   state["op"], start, outcomes)))

    # The files the image writes (itself, an external data file) are recorded together;
    # backing files are only read.
    recorder = Recorder(closed)
    real_open = qnbd.fileio.open_file
    monkeypatch.setattr(qnbd.fileio, "open_file",
                        lambda path, writable: recorder.wrap(real_open(path, writable))
                        if writable else real_open(path, writable))
    dev = open_image(image, fmt, read_only=False)
    model = Model(start, discard_unit(dev), discard_keeps=discard_keeps)
    done = []

    def touch(off, n):
        first, last = off // SECTOR, (off + n - 1) // SECTOR
        state["touched"][first:last + 1] = b"\1" * (last - first + 1)

    def flushed(still_out):
        """A flush ran: the model holds what was committed; writes still out stay
        "touched"."""
        state["flushed"] = bytes(model.data)
        state["touched"] = bytearray(len(start) // SECTOR + 1)
        for _k, o, m, _p in still_out:
            touch(o, m)

    out = _PooledWrites(dev, model, pooled, failing, flushed) if pooled else None

    def do(op):
        kind, off, n, pattern = op
        fua = kind == "write" and pattern % 17 == 0
        if out is not None and not out.may_run(op):
            out.settle()
        state["op"] = f"op {len(done)} {op}" + (" (pooled)" if out and out.plans else "")
        done.append(op)
        if kind != "flush":
            touch(off, n)
        # A small FUA write runs inline beside the writes out, as the server lets it.
        if out is not None and kind == "write" and not (fua and n <= INLINE_FUA):
            out.plan(op, fua)
            return
        apply_ops(dev, model, [op])
        if kind == "flush" or fua:
            flushed([op for _plan, op in out.plans] if out else ())

    try:
        drive(dev, do)
        if out is not None:
            state["op"] = "the last writes out"
            out.settle()
        state["op"] = "close"
    finally:
        dev.close()
        monkeypatch.setattr(qnbd.fileio, "open_file", real_open)
    return image, intervals


# FUA writes up to this size run inline in the pooled workloads; larger ones are planned.
INLINE_FUA = 4096


class _PooledWrites:
    """WRITEs as the server runs them with its WritePool (qnbd/nbd/writes.py): each one
    planned on arrival (write_plan), while it touches no cluster of a write still out;
    then the HostWrites of all those out performed in a random order, interleaved, and
    the plans committed in a random order (a FUA plan's commit flushes: `flushed`).
    `failing` of them fail after a random number of their HostWrites landed and are
    aborted, as the pool does on an EIO: nothing mapped, their new clusters queued for
    release, the range as it reads now. Meanwhile a FUA write touching none of their
    clusters runs inline, flush included, as the server lets a small one do; anything
    else first waits for every write out (settle)."""

    def __init__(self, dev, model, rng: random.Random, failing: float, flushed):
        self.dev = dev
        self.model = model
        self.rng = rng
        self.failing = failing
        self.flushed = flushed
        self.cs = dev.cluster_size
        self.plans: list = []   # (plan, op)

    def may_run(self, op) -> bool:
        kind, off, n, _pattern = op
        if kind != "write":
            return not self.plans
        first, end = off // self.cs, -(-(off + n) // self.cs)
        return all(end <= o // self.cs or -(-(o + m) // self.cs) <= first
                   for _plan, (_k, o, m, _p) in self.plans)

    def plan(self, op, fua: bool) -> None:
        _kind, off, n, pattern = op
        buf = bytes([pattern]) * n
        self.plans.append((self.dev.write_plan(off, buf, fua), op))

    def settle(self) -> None:
        failed = set()
        writes = []
        for plan, _op in self.plans:
            landed = plan.writes
            if self.failing and self.rng.random() < self.failing:
                failed.add(id(plan))
                landed = landed[:self.rng.randrange(len(landed) + 1)]
            writes += landed
        self.rng.shuffle(writes)
        for w in writes:
            w.perform()
        self.rng.shuffle(self.plans)
        while self.plans:
            plan, op = self.plans.pop(0)
            _kind, off, n, pattern = op
            if id(plan) in failed:
                plan.abort()
                # NBD leaves a failed write's range unspecified: what landed in clusters
                # it rewrote in place shows; new ones were never mapped, so every byte
                # reads as before or as written, never anything else.
                got = bytes(self.dev.read(off, n))
                old = self.model.data[off:off + n]
                assert all(g in (o, pattern) for g, o in zip(got, old)), \
                    f"an aborted {op} left bytes that are neither old nor its own"
                self.model.write(off, got)
                continue
            plan.commit()
            self.model.write(off, bytes([pattern]) * n)
            if pattern % 17 == 0:   # FUA (apply_ops): its commit flushed
                self.flushed([op for _plan, op in self.plans])


# The two workers of enumerate_crashes are threads of this process. A repair opens an image
# read-write here, taking QEMU's locks (OFD locks, held by the open file description); a
# process the other worker starts meanwhile gets a copy of the descriptor, which lives on
# until that child execs. Our close then leaves the locks held, and the qemu-img check
# that follows fails with 'Failed to get shared "write" lock'. So the repair and every
# process start (Popen returns once the child has exec'd) take turns.
_spawning = threading.Lock()


def _run(*cmd, check=False, cwd=None) -> subprocess.CompletedProcess:
    with _spawning:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=cwd)
    out, err = p.communicate()
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check:
        r.check_returncode()
    return r


def _need_check(path: str) -> bool:
    with open(path, "rb") as f:
        return bool(f.read(24)[16] & 0x02)  # qed_spec.txt "Header": features, NEED_CHECK


def check_state(slot: str, image: str, contents: dict, ctx: Context, what: str,
                fmt: str = "qcow2"):
    """Why this crash state is wrong, or None. The state's files are written into the
    directory `slot` under their own names, beside links to the image's other files
    (backing files), and every tool runs there: qemu opens a relative data file name
    from its working directory. qcow2: no corruption (leaks allowed); a dirty image is
    repaired by our read-write open and must then be clean (rule 6). QED (rule 12):
    without NEED_CHECK nothing at all may be wrong, not even a leak; with it, our
    read-write open repairs the image and clears the bit (leaks in the middle of the
    file may stay: QED cannot reuse them)."""
    for path, content in contents.items():
        with open(os.path.join(slot, os.path.basename(path)), "wb") as f:
            f.write(content)
    path = os.path.join(slot, os.path.basename(image))
    where = f"{what}, during {ctx.during}"
    r = _run("qemu-img", "info", "-f", fmt, "--output=json", path, cwd=slot)
    if r.returncode:
        return f"{where}: qemu-img info fails: {r.stderr.strip()}"
    info = json.loads(r.stdout)
    repair = _need_check(path) if fmt == "qed" else info.get("dirty-flag", False)
    if repair:
        try:
            with _spawning:
                open_image(path, fmt, read_only=False).close()
        except QnbdError as e:
            return f"{where}: the repairing open fails: {e}"
        if fmt == "qed" and _need_check(path):
            return f"{where}: NEED_CHECK still set after the repair"
    r = _run("qemu-img", "check", "-f", fmt, "--output=json", path, cwd=slot)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    if r.returncode not in (0, 3) or report.get("corruptions", 0):
        return f"{where}: qemu-img check rc {r.returncode}: {r.stdout}{r.stderr}"
    leaks_allowed = repair if fmt == "qed" else not repair
    if r.returncode and not leaks_allowed:
        return f"{where}: leaks ({'NEED_CHECK clear' if fmt == 'qed' else 'repaired'}): " \
            f"{r.stdout}"
    out = os.path.join(slot, "content.raw")
    _run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, out, check=True, cwd=slot)
    with open(out, "rb") as f:
        data = f.read()
    if ctx.outcomes:
        return _check_outcome(path, info, data, ctx.outcomes, where, slot)
    if len(data) != len(ctx.flushed):
        return f"{where}: size {len(data)} instead of {len(ctx.flushed)}"
    for sector, touched in enumerate(ctx.touched):
        lo = sector * SECTOR
        if not touched and data[lo:lo + SECTOR] != ctx.flushed[lo:lo + SECTOR]:
            return f"{where}: flushed data lost at offset {lo}"
    return _check_bitmaps(path, info, data, ctx.start, where)


def _check_bitmaps(path: str, info: dict, data: bytes, start: bytes, where: str):
    """Rule 9: a bitmap stored as consistent (not in use) covers every change made
    since the image was opened (its bits were all clear then: the shapes add empty,
    enabled bitmaps). The dirty bits are read by qemu itself (qemu-nbd -B)."""
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    changed = [i for i in range(0, len(data), SECTOR)
               if data[i:i + SECTOR] != start[i:i + SECTOR]]
    for bitmap in bitmaps:
        if "in-use" in bitmap["flags"] or not changed:
            continue
        with _spawning:  # it starts processes
            dirty = qemu_dirty_map(path, bitmap["name"])
        missed = [i for i in changed if not any(o <= i < o + n for o, n in dirty)]
        if missed:
            return (f"{where}: bitmap '{bitmap['name']}' is stored as consistent but "
                    f"misses the change at offset {missed[0]}")
    return None


def _check_outcome(path: str, info: dict, data: bytes, outcomes, where: str, slot: str):
    """A snapshot operation cut short: the snapshot table and the active layer are the
    old ones or the new ones, and every listed snapshot reads what it held."""
    ids = [s["id"] for s in info.get("snapshots", [])]
    for want_ids, active, contents in outcomes:
        if ids == want_ids and data == active:
            break
    else:
        return f"{where}: snapshots {ids} with an active layer of neither outcome"
    out = os.path.join(slot, "snapshot.raw")
    for sid in ids:
        _run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", "-l",
             f"snapshot.id={sid}", path, out, check=True, cwd=slot)
        with open(out, "rb") as f:
            if f.read() != contents[sid]:
                return f"{where}: snapshot {sid} does not read what it held"
    return None


def enumerate_crashes(image: str, intervals, seed: int, scratch) -> tuple[int, list[str]]:
    """Check every crash state of every interval, two at a time (qemu-img runs in
    subprocesses); returns how many states were checked and the failures."""
    rng = random.Random(seed)
    fmt = probe(image)
    jobs = [(what, contents, iv.context) for iv in intervals
            for what, contents in crash_states(iv, rng)]
    directory = os.path.dirname(image)
    recorded = {os.path.basename(p) for iv in intervals for p in iv.durable}
    slots = []
    for slot in range(2):  # one directory per worker: states in flight share no file
        d = os.path.join(str(scratch), f"slot{slot}")
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(directory):
            target = os.path.join(directory, name)
            if name not in recorded and os.path.isfile(target) and \
                    not os.path.exists(os.path.join(d, name)):
                os.symlink(target, os.path.join(d, name))
        slots.append(d)

    def check(job_index):
        what, contents, ctx = jobs[job_index]
        return check_state(slots[job_index % 2], image, contents, ctx, what, fmt)

    with ThreadPoolExecutor(2) as pool:
        failures = []
        for start in range(0, len(jobs), 2):
            failures += [f for f in pool.map(check, range(start, min(start + 2, len(jobs))))
                         if f]
    return len(jobs), failures


# -- scenarios aimed at one ordering rule each -----------------------------------------

L1_OFFSET = 0x00FFFFFFFFFFFE00  # qcow2.rst: bits 9-55 of L1 and L2 entries

def issue10_scenario(directory, monkeypatch):
    """The corruption of the engine issue: 512 B clusters, 64-bit refcounts, a raw
    backing file. A data cluster is written into an L2 table already on disk, then
    write-zeroes over a range with no L2 table needs a new table whose allocation needs
    a new refcount block, then a flush: the data cluster's refcount must be durable
    before the old L2 table is rewritten to point to it."""
    shape = SHAPES[0]
    cs = 512
    table_span = cs * (cs // 8)  # guest bytes one L2 table maps

    def drive(dev, do):
        do(("write", 0, cs, 3))
        do(("flush", 0, 0, 0))  # the L2 table of guest offset 0 is on disk
        rc = dev.refcounts
        # Fill the free clusters of the allocated regions, one data cluster at a time
        # into that same table, until the next allocation opens a new region.
        guest = cs
        while True:
            nxt = rc._next_free(rc.free_hint)
            region = nxt // rc.per_block
            if nxt % rc.per_block == 0 and not (region < len(rc.table) and rc.table[region]):
                break
            do(("write", guest, cs, 5))
            guest += cs
        assert guest < table_span, "the regions did not fill within one table"
        do(("zero", 3 * table_span, table_span, 0))  # a new L2 table, a new refblock
        do(("flush", 0, 0, 0))

    return record_driven(shape, directory, monkeypatch, drive)


def reftable_growth_scenario(directory, monkeypatch):
    """512 B clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB of
    file, so writing 3 MiB moves the table (new table, header switch, old one freed)."""
    shape = Shape("c512-r64", "cluster_size=512,refcount_bits=64", size=4 * MiB)

    def drive(dev, do):
        for off in range(0, 3 * MiB, 256 * 1024):
            do(("write", off, 256 * 1024, 7))
        do(("flush", 0, 0, 0))

    return record_driven(shape, directory, monkeypatch, drive)


def repair_on_open_scenario(directory, monkeypatch):
    """A lazy-refcounts image left dirty by qemu (killed after a flush: its refcounts
    lag behind its L2 tables) is repaired when opened read-write; power cuts during the
    repair leave an image that is consistent or still dirty (and repaired next time)."""
    image = str(directory / "dirty.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", image,
        str(4 * MiB))
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M",
                        "-c", "write -P 2 2M 512k", "-c", "flush", "-c", "sigraise 9", image],
                       capture_output=True)
    assert r.returncode != 0  # killed, as intended
    return record_on(image, directory, monkeypatch, lambda dev, do: None)


def repair_raises_refcount_scenario(directory, monkeypatch):
    """A dirty image whose refcount is too low but not zero (a cluster shared with an
    internal snapshot, refcount 1 where it is referenced twice): the repair raises it
    in place, and only then clears the dirty bit (Barrier.REPAIR between them)."""
    image = str(directory / "shared.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", image,
        str(4 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 256k", image)
    run("qemu-img", "snapshot", "-c", "s1", image)
    l1 = read_u64(image, read_field(image, "l1_table_offset")) & L1_OFFSET
    data = read_u64(image, l1) & L1_OFFSET  # the first data cluster, now shared
    cluster_bits = read_field(image, "cluster_bits")
    reftable = read_field(image, "refcount_table_offset")
    per_block = (1 << cluster_bits) * 8 // 16
    cluster = data >> cluster_bits
    block = read_u64(image, reftable + 8 * (cluster // per_block))
    patch_bytes(image, block + 2 * (cluster % per_block), (1).to_bytes(2, "big"))
    patch_fields(image, incompatible_features=read_field(image, "incompatible_features")
                 | INCOMPAT_DIRTY)
    return record_on(image, directory, monkeypatch, lambda dev, do: None)


def data_file_scenario(raw: bool):
    """An image with an external data file (rule 13), written at random: data in the
    data file must be durable before the L2 entry that maps it, and with data_file_raw
    the data file must hold zeros wherever the guest reads zeros."""
    def scenario(directory, monkeypatch):
        opts = "data_file=img.data" + (",data_file_raw=on" if raw else "")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size=4096,{opts}",
            "img.qcow2", str(4 * MiB), cwd=directory)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -z 2M 64k",
            "img.qcow2", cwd=directory)
        ops = crash_ops(random.Random(5), 4 * MiB, 30)
        return record_on(str(directory / "img.qcow2"), directory, monkeypatch,
                         lambda dev, do: [do(op) for op in ops])
    return scenario


def data_file_reuse_scenario(directory, monkeypatch):
    """A cluster of a data file image written, zeroed (the zero flag: the data file
    keeps the old bytes), then written in part: the copy-on-write puts zeros around the
    new bytes in the data file, and only once they are durable may the L2 entry map the
    cluster again, or the old bytes would show through (rules 4 and 13)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,data_file=img.data",
        "img.qcow2", str(4 * MiB), cwd=directory)

    def drive(dev, do):
        do(("write", 8192, 4096, 0x5a))
        do(("flush", 0, 0, 0))
        do(("zero", 8192, 4096, 0))
        do(("flush", 0, 0, 0))
        do(("write", 8192 + 512, 512, 0x6b))
        do(("flush", 0, 0, 0))

    return record_on(str(directory / "img.qcow2"), directory, monkeypatch, drive)


def data_file_resize_scenario(raw: bool):
    """A data file image grown from 1 to 1.5 MiB: the data file first, a larger L1 table
    (it moves), with data_file_raw L2 tables mapping every new cluster (512-byte
    clusters: 16 of them), the new size last. A crash shows the old size or the new one, the old data
    intact, the new space reading as zeros."""
    def scenario(directory, monkeypatch):
        opts = "cluster_size=512,data_file=img.data" + (",data_file_raw=on" if raw else "")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2",
            str(MiB), cwd=directory)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 256k", "-c", "write -P 2 768k 256k",
            "img.qcow2", cwd=directory)
        image = str(directory / "img.qcow2")
        before = converted(image, "qcow2", directory)
        grown = before + bytes(MiB // 2)
        outcomes = (([], before, {}), ([], grown, {}))
        return record_on(image, directory, monkeypatch,
                         lambda dev, do: dev.resize(MiB * 3 // 2), outcomes=outcomes)
    return scenario


def pooled_ops(rng: random.Random, size: int, count: int) -> list:
    """Runs of writes (a few sectors to several clusters; one in five FUA and small, run
    inline, one in seven FUA and planned) with a zero, discard or flush now and then:
    many writes out together, and FUA flushes among them."""
    ops = []
    for i in range(count):
        kind = rng.choice(["write"] * 8 + ["zero", "discard", "flush"])
        off = rng.randrange(0, size)
        if rng.random() < 0.3:
            off = off // 4096 * 4096
        n = rng.choice([1, 512, 3000, 4096, 9000, 65536, rng.randrange(1, 70000)])
        pattern = rng.randrange(1, 256)
        if i % 5 == 4 and kind == "write":
            # FUA (apply_ops: a multiple of 17), small enough to run inline beside the
            # writes out.
            pattern, n = 17 * rng.randrange(1, 15), min(n, INLINE_FUA)
        elif i % 7 == 6 and kind == "write":
            # FUA and planned: its commit flushes while other plans are out.
            pattern, n = 17 * rng.randrange(1, 15), max(n, INLINE_FUA + 1)
        elif pattern % 17 == 0:
            pattern -= 1
        ops.append((kind, off, max(1, min(n, size - off)), pattern))
    return ops


# Shapes for the pooled workloads, with the span their writes go to: 4 KiB clusters
# over a raw backing file, in the part the backing file covers (a partial write copies
# its sectors around the new data: they show if an entry maps the cluster before its
# data is there); 512-byte clusters with 64-bit refcounts; subclusters.
POOLED_SHAPES = [
    (Shape("c4k-raw", "cluster_size=4096", backing="raw", size=4 * MiB), MiB),
    *((s, s.size) for s in SHAPES if s.name in ("c512-r64-raw", "extl2-c16k")),
]


def pooled_scenario(shape: Shape, span: int, seed: int, count: int):
    def scenario(directory, monkeypatch):
        ops = pooled_ops(random.Random(seed), span, count)
        return record_on(shape.build(directory), directory, monkeypatch,
                         lambda dev, do: [do(op) for op in ops],
                         pooled=random.Random(seed), failing=0.25)
    return scenario


def pooled_mapping_scenario(directory, monkeypatch):
    """Rule 4 with writes out: partial writes into unallocated 4 KiB clusters over a raw
    backing file full of data are planned (each new cluster gets the backing file's
    bytes around the new ones), then a FUA write beside them runs inline and flushes
    the L2 tables while their data is not written yet. An entry that reached the disk
    before its cluster's data would show zeros in place of the backing file's bytes."""
    (directory / "base.raw").write_bytes(random.Random(9).randbytes(MiB))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
        "base.raw", "-F", "raw", "img.qcow2", str(MiB), cwd=directory)
    ops = [("write", 16384 * k + 1024, 512, 101 + 4 * k) for k in range(10)]
    ops += [("write", 512 * 1024, 512, 34), ("flush", 0, 0, 0)]   # 34: FUA
    return record_on(str(directory / "img.qcow2"), directory, monkeypatch,
                     lambda dev, do: [do(op) for op in ops], pooled=random.Random(1))


def random_scenario(shape_name: str, seed: int, count: int):
    shape = next(s for s in SHAPES + QED_SHAPES if s.name == shape_name)
    return lambda directory, monkeypatch: record_workload(
        shape, directory, crash_ops(random.Random(seed), shape.size, count), monkeypatch)


def snapshot_scenario(operation: str, options: str):
    """qnbd's snapshot create, apply or delete (rule 15) on an image of 512-byte clusters
    (a refcount block for every 64 to 256 clusters, many L2 tables) that already has two
    snapshots made by qemu-img, with data, compressed data and zeroes in each layer and
    clusters shared by all of them."""
    def scenario(directory, monkeypatch):
        image = str(directory / "snap.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, image, str(MiB))
        layers = [["write -P 1 0 256k", "write -c -P 2 512k 16k"],
                  ["write -P 3 128k 64k", "write -z 600k 8k", "write -P 4 900k 2k"],
                  ["write -P 5 0 4k", "write -c -P 6 704k 16k"]]
        if "preallocation" in options:  # qemu writes compressed to unallocated clusters only
            layers = [[c.replace("write -c ", "write ") for c in cmds] for cmds in layers]
        contents = {}
        for n, cmds in enumerate(layers):
            run("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], image)
            if n < 2:
                run("qemu-img", "snapshot", "-c", f"s{n + 1}", image)
                contents[str(n + 1)] = converted(image, "qcow2", directory)
        active = converted(image, "qcow2", directory)
        if operation == "create":
            new = dict(contents, **{"3": active})
            outcomes = ((["1", "2"], active, contents), (["1", "2", "3"], active, new))
            drive = (lambda dev, do: dev.snapshot_create(b"s3", 0))
        elif operation == "apply":
            outcomes = ((["1", "2"], active, contents), (["1", "2"], contents["1"], contents))
            drive = (lambda dev, do: dev.snapshot_apply("s1"))
        else:
            # The newer one: clusters it shares with the active layer alone become the
            # active layer's again (COPIED set again).
            rest = {"1": contents["1"]}
            outcomes = ((["1", "2"], active, contents), (["1"], active, rest))
            drive = (lambda dev, do: dev.snapshot_delete(dev.snapshots[1]))
        return record_on(image, directory, monkeypatch, drive, outcomes=outcomes)
    return scenario


# v3 and lazy refcounts; v2 has no dirty bit (rule 15): only its apply is crash-clean.
SNAPSHOT_SCENARIOS = {
    f"snapshot-{op}-{name}": snapshot_scenario(op, options)
    for name, options in (("c512-r64", "cluster_size=512,refcount_bits=64"),
                          ("lazy", "cluster_size=512,lazy_refcounts=on"),
                          ("extl2", "cluster_size=16384,extended_l2=on"),
                          # whole tables and refcount blocks as single runs (issue 17)
                          ("prealloc", "cluster_size=512,preallocation=metadata"),
                          ("v2", "cluster_size=512,compat=0.10"))
    for op in ("create", "apply", "delete") if name != "v2" or op == "apply"}


SCENARIOS = {
    "issue-10": issue10_scenario,
    "reftable-growth": reftable_growth_scenario,
    "repair-on-open": repair_on_open_scenario,
    "repair-raises-refcount": repair_raises_refcount_scenario,
    "data-file": data_file_scenario(raw=False),
    "data-file-raw": data_file_scenario(raw=True),
    "data-file-reuse": data_file_reuse_scenario,
    "data-file-resize": data_file_resize_scenario(raw=False),
    "data-file-raw-resize": data_file_resize_scenario(raw=True),
    "pooled-mapping": pooled_mapping_scenario,
    "pooled-c4k-raw": pooled_scenario(*POOLED_SHAPES[0], 3, 30),
}
