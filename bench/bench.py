#!/usr/bin/env python3
"""qnbd against qemu-nbd on identical qcow2 images in /dev/shm, with fio's nbd engine.

    ./dev bench [--rounds N] [--runtime SECONDS] [--jobs a,b,...] [--skip-extras]
                [--disk-dir DIR] [--baseline SRC]

--baseline SRC also runs the qnbd whose source tree is SRC (e.g. `git worktree add` of
main, or `git archive main | tar -x -C SRC`) as a third server, in the same alternated
rounds: before/after ratios measured side by side on a noisy machine.

The cold-disk job reads a fully allocated 2 GiB image kept on the disk (--disk-dir, not
tmpfs) with the page cache dropped before each run, and also measures the device's own
limit: fio with io_uring on the image file under the same conditions (buffered, cold).
The nbdcopy jobs copy 512 MiB with `nbdcopy --connections=4` out of and into a
multi-conn export (-e 4); their "IOPS" column is MiB/s too.

Each round runs every job once against each server, alternating which goes first, and
prints per-job IOPS/bandwidth for both and the median ratio qnbd/qemu-nbd. Then: peak RSS
serving a 1 TiB image after a random read/write load, time to open a 1 TiB image with
a few GiB allocated, time for `nbdinfo --map` over a 1 TiB sparse image, and `qnbd check`
against `qemu-img check` of both 1 TiB images.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
GiB = 1 << 30

# name: (fio options, image kind)
JOBS = {
    "seqread-1M": (["--rw=read", "--bs=1M", "--iodepth=4"], "full"),
    "randread-4k": (["--rw=randread", "--bs=4k", "--iodepth=16"], "full"),
    "randwrite-4k-alloc": (["--rw=randwrite", "--bs=4k", "--iodepth=16"], "empty"),
    "seqwrite-1M-alloc": (["--rw=write", "--bs=1M", "--iodepth=4"], "empty"),
    # The small-write integrity pattern: each 4 KiB write into new clusters followed by
    # a FLUSH (fio's fsync=1 is NBD_CMD_FLUSH), as a journaling guest does.
    "smallwrite-flush": (["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "empty"),
    "cold-randread-4k": (["--rw=randread", "--bs=4k", "--iodepth=16"], "disk"),
    # nbdcopy --connections=4 between a multi-conn export (-e 4) and /dev/shm: the whole
    # 512 MiB image out to null:, or a 512 MiB raw file into an empty image.
    "nbdcopy-from-4conn": (None, "full"),
    "nbdcopy-to-4conn": (None, "empty"),
}
# Issue 17's targets: the four /dev/shm fio jobs at 2x qemu-nbd, the rest no slower.
TARGETS = {"randread-4k": 2.0, "seqread-1M": 2.0, "randwrite-4k-alloc": 2.0,
           "seqwrite-1M-alloc": 2.0, "smallwrite-flush": 1.0, "cold-randread-4k": 2.0,
           "nbdcopy-from-4conn": 1.0, "nbdcopy-to-4conn": 1.0}
DISK_IMAGE_SIZE = "2G"


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          **kw)


class Server:
    """One NBD server process on a unix socket, exporting one image read-write."""

    baseline = None   # source tree of the "qnbd-base" server (--baseline)

    def __init__(self, kind, image, sock, options=()):
        self.kind = kind
        self.sock = sock
        env = cwd = None
        if kind.startswith("qnbd"):
            cmd = [sys.executable, "-m", "qnbd.cli", "serve", "-f", "qcow2", "-t",
                   "-k", sock, *options, image]
            if kind == "qnbd-base":
                # `-m` puts the working directory first on sys.path: from inside another
                # tree, PYTHONPATH alone would run that tree's qnbd.
                env = dict(os.environ, PYTHONPATH=self.baseline)
                cwd = self.baseline
        else:
            cmd = ["qemu-nbd", "-f", "qcow2", "-t", "-k", sock, *options, image]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, cwd=cwd)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.02)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def rss_peak_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fio(uri, options, runtime, size):
    out = sh("fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--direct=1",
             f"--size={size}", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
             "--output-format=json", *options).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["iops"], side["bw_bytes"] / MiB


def make_images(work):
    """The full 512 MiB qcow2 image, and its raw source (nbdcopy-to-4conn copies it)."""
    full = os.path.join(work, "full.qcow2")
    raw = os.path.join(work, "full.raw")
    with open(raw, "wb") as f:
        for _ in range(512):
            f.write(os.urandom(MiB))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, full)
    return {"full": full, "raw": raw}


def nbdcopy(source, destination):
    """(MiB/s as IOPS of 1 MiB, MiB/s) of one copy of 512 MiB with 4 connections."""
    t0 = time.monotonic()
    sh("nbdcopy", "--connections=4", source, destination)
    rate = 512 / (time.monotonic() - t0)
    return rate, rate


def make_disk_image(disk_dir):
    """A fully allocated qcow2 image on the disk, for the cold-disk job."""
    path = os.path.join(disk_dir, "cold.qcow2")
    raw = os.path.join(disk_dir, "cold.raw")
    with open(raw, "wb") as f:
        chunk = os.urandom(16 * MiB)
        for i in range(128):
            # Distinct content per chunk (no dedup anywhere below us), cheaply.
            f.write(i.to_bytes(8, "little") + chunk[8:])
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    os.unlink(raw)
    return path


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fio_file(path, options, runtime):
    """The device's limit: fio with io_uring straight on the image file, cold."""
    drop_caches()
    out = sh("fio", "--name=device", "--ioengine=io_uring", f"--filename={path}",
             "--direct=0", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
             "--output-format=json", *options).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read"]["iops"], job["read"]["bw_bytes"] / MiB


def fresh_empty(work, name):
    path = os.path.join(work, name)
    if os.path.exists(path):
        os.unlink(path)
    sh("qemu-img", "create", "-q", "-f", "qcow2", path, "4G")
    return path


def run_job(kind, job, work, images, runtime):
    options, image_kind = JOBS[job]
    if image_kind == "empty":
        image = fresh_empty(work, f"empty-{kind}.qcow2")
    else:
        image = images[image_kind]
    sock = os.path.join(work, f"{kind}.sock")
    copy = job.startswith("nbdcopy-")
    server = Server(kind, image, sock, ["-e", "4"] if copy else ())
    try:
        if job == "nbdcopy-from-4conn":
            return nbdcopy(server.uri, "null:")
        if job == "nbdcopy-to-4conn":
            return nbdcopy(images["raw"], server.uri)
        # Random jobs read/write the whole image; sequential ones stay inside it.
        size = {"full": "512M", "empty": "4G", "disk": DISK_IMAGE_SIZE}[image_kind]
        if image_kind == "disk":
            drop_caches()   # after the server's open: its metadata reads are cold too
        return fio(server.uri, options, runtime, size)
    finally:
        server.stop()


def extras(work):
    """Memory, open time and map time on 1 TiB images."""
    results = {}
    big = os.path.join(work, "big.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", big, "1T")
    # A few GiB allocated, spread over the disk: 2048 writes of 1 MiB.
    cmds = []
    for i in range(2048):
        cmds += ["-c", f"write -P 1 {i * 512 * MiB} 1M"]
    sh("qemu-io", "-f", "qcow2", *cmds, big)
    for kind in ("qnbd", "qemu-nbd"):
        sock = os.path.join(work, f"big-{kind}.sock")
        t0 = time.monotonic()
        server = Server(kind, big, sock)
        sh("nbdinfo", "--size", server.uri)
        opened = time.monotonic() - t0
        try:
            fio(server.uri, ["--rw=randrw", "--bs=4k", "--iodepth=16"], 5, "1T")
            rss = server.rss_peak_kib() / 1024
        finally:
            server.stop()
        results[kind] = {"open+first-reply-s": opened, "peak-rss-MiB": rss}
    # The engine's own open (header, L1 and refcount tables, bitmaps), timed in-process.
    out = sh(sys.executable, "-c", "import sys, time; from qnbd.formats import open_image;"
             "t = time.perf_counter(); d = open_image(sys.argv[1], read_only=False);"
             "print(time.perf_counter() - t); d.close()", big).stdout
    results["qnbd"]["engine-open-1T-s"] = float(out)
    sparse = os.path.join(work, "sparse.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", sparse, "1T")
    for kind in ("qnbd", "qemu-nbd"):
        sock = os.path.join(work, f"sparse-{kind}.sock")
        server = Server(kind, sparse, sock)
        try:
            t0 = time.monotonic()
            sh("nbdinfo", "--map", server.uri)
            results[kind]["map-1T-sparse-s"] = time.monotonic() - t0
        finally:
            server.stop()
    results["qemu-img"] = {}
    for image, name in ((big, "check-1T-2048-L2-s"), (sparse, "check-1T-sparse-s")):
        times = {"qnbd": [], "qemu-img": []}
        for _ in range(3):  # alternated, median: the whole command, startup included
            for kind, cmd in (("qemu-img", ["qemu-img"]),
                              ("qnbd", [sys.executable, "-m", "qnbd.cli"])):
                t0 = time.monotonic()
                sh(*cmd, "check", image)
                times[kind].append(time.monotonic() - t0)
        for kind, ts in times.items():
            results[kind][name] = statistics.median(ts)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--skip-extras", action="store_true")
    ap.add_argument("--baseline", metavar="SRC",
                    help="also run the qnbd of this source tree, as qnbd-base")
    ap.add_argument("--disk-dir", default="/var/tmp",
                    help="where the cold-disk job's image lives (a disk, not tmpfs)")
    args = ap.parse_args()
    jobs = args.jobs.split(",")
    for job in jobs:
        if job not in JOBS:
            raise SystemExit(f"unknown job {job}; known: {', '.join(JOBS)}")
    work = tempfile.mkdtemp(prefix="qnbd-bench-", dir="/dev/shm")
    disk_work = None
    try:
        images = make_images(work)
        if any(JOBS[job][1] == "disk" for job in jobs):
            disk_work = tempfile.mkdtemp(prefix="qnbd-bench-", dir=args.disk_dir)
            images["disk"] = make_disk_image(disk_work)
        kinds = ["qnbd", "qemu-nbd"]
        if args.baseline:
            Server.baseline = os.path.abspath(args.baseline)
            kinds.append("qnbd-base")
        results = {job: {kind: [] for kind in kinds} for job in jobs}
        device = []
        loads = [os.getloadavg()[0]]
        for r in range(args.rounds):
            # Each server goes first in turn (and last, with two).
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for job in jobs:
                for kind in order:
                    results[job][kind].append(run_job(kind, job, work, images, args.runtime))
                if JOBS[job][1] == "disk":
                    device.append(fio_file(images["disk"], JOBS[job][0], args.runtime))
                loads.append(os.getloadavg()[0])
        print(f"load average (1 min) during the rounds: {min(loads):.1f}-{max(loads):.1f}, "
              f"median {statistics.median(loads):.1f}")
        print(f"{'job':22} {'qnbd IOPS':>11} {'qemu-nbd IOPS':>14} {'qnbd MiB/s':>11} "
              f"{'qemu MiB/s':>11} {'ratio':>6} {'target':>7}")
        for job in jobs:
            q = results[job]["qnbd"]
            m = results[job]["qemu-nbd"]
            ratios = [a[0] / b[0] for a, b in zip(q, m)]
            ratio = statistics.median(ratios)
            print(f"{job:22} {statistics.median(x[0] for x in q):11.0f} "
                  f"{statistics.median(x[0] for x in m):14.0f} "
                  f"{statistics.median(x[1] for x in q):11.1f} "
                  f"{statistics.median(x[1] for x in m):11.1f} {ratio:6.2f} "
                  f"{TARGETS.get(job, 0):6.1f}x")
            if args.baseline:
                b = results[job]["qnbd-base"]
                print(f"{'  before (qnbd-base)':22} {statistics.median(x[0] for x in b):11.0f} "
                      f"{'':14} {statistics.median(x[1] for x in b):11.1f} {'':11} "
                      f"{statistics.median(a[0] / c[0] for a, c in zip(b, m)):6.2f}   "
                      f"rounds {' '.join(f'{x[0]:.0f}' for x in b)}")
            print(f"{'':22} qnbd rounds {' '.join(f'{x[0]:.0f}' for x in q)}; "
                  f"qemu-nbd rounds {' '.join(f'{x[0]:.0f}' for x in m)}; "
                  f"ratios {' '.join(f'{x:.2f}' for x in ratios)}")
            if JOBS[job][1] == "disk" and device:
                dev = statistics.median(x[0] for x in device)
                share = statistics.median(a[0] / b[0] for a, b in zip(q, device))
                print(f"{'  fio io_uring on file':22} {dev:11.0f} IOPS (rounds "
                      f"{' '.join(f'{x[0]:.0f}' for x in device)}); qnbd = {share:.0%} "
                      f"of it (target 60%), qemu-nbd = "
                      f"{statistics.median(a[0] / b[0] for a, b in zip(m, device)):.0%}")
        if not args.skip_extras:
            print(json.dumps(extras(work), indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if disk_work:
            shutil.rmtree(disk_work, ignore_errors=True)


if __name__ == "__main__":
    main()
