#!/usr/bin/env python3
"""Server CPU per operation: qnbd (one or more source trees) against qemu-nbd.

    ./dev bench-cpu [--jobs a,b] [--rounds N] [--tree SRC ...] [--profile DIR]

On a shared two-core machine a rate says as much about the neighbours as about the
server; the CPU the server process spent (utime+stime from /proc/PID/stat) on a fixed
amount of work does not. Each round runs every job once against each server, the order
rotated; the medians and the spread (min-max) of CPU per operation are printed with the
rates. The jobs are bench.py's, with a fixed count of I/Os instead of a run time
(nbdcopy jobs copy their 512 MiB: "per op" is per MiB there).

--tree SRC adds the qnbd of that source tree (e.g. /work/main) as one more server.
--profile DIR records each qnbd run with py-spy (raw collapsed stacks, --native),
for the breakdown of where a request's CPU goes.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (bench.py beside this file: images, servers, the jobs)

# Fixed work per job: fio I/O count (nbdcopy jobs: the whole image).
COUNTS = {"seqread-1M": 4096, "randread-4k": 200_000, "randwrite-4k-alloc": 100_000,
          "seqwrite-1M-alloc": 2048, "smallwrite-flush": 5000, "cold-randread-4k": 30_000}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK   # utime, stime


def fio_count(uri, options, count, size):
    out = bench.sh("fio", "--name=cpu", "--ioengine=nbd", f"--uri={uri}", "--direct=1",
                   f"--size={size}", f"--number_ios={count}", "--output-format=json",
                   *options).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["total_ios"], side["iops"]


def run(kind, tree, job, work, images, profile):
    options, image_kind = bench.JOBS[job]
    image = bench.fresh_empty(work, f"empty-{kind}.qcow2") if image_kind == "empty" \
        else images[image_kind]
    sock = os.path.join(work, f"{kind}.sock")
    copy = job.startswith("nbdcopy-")
    bench.Server.baseline = tree
    server = bench.Server(kind, image, sock, ["-e", "4"] if copy else ())
    spy = None
    try:
        if image_kind == "disk":
            bench.drop_caches()
        if profile and kind != "qemu-nbd":
            out = os.path.join(profile, f"{job}-{os.path.basename(tree or 'here')}.txt")
            spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--native", "--format", "raw",
                                    "-r", "250", "-o", out, "-p", str(server.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = cpu_seconds(server.proc.pid)
        if job == "nbdcopy-from-4conn":
            rate, _ = bench.nbdcopy(server.uri, "null:")
            ops = 512
        elif job == "nbdcopy-to-4conn":
            rate, _ = bench.nbdcopy(images["raw"], server.uri)
            ops = 512
        else:
            size = {"full": "512M", "empty": "4G", "disk": bench.DISK_IMAGE_SIZE}[image_kind]
            ops, rate = fio_count(server.uri, options, COUNTS[job], size)
        used = cpu_seconds(server.proc.pid) - before
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
        server.stop()
    return used / ops * 1e6, rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", default="cold-randread-4k,randread-4k,seqread-1M,"
                                      "nbdcopy-from-4conn")
    ap.add_argument("--tree", action="append", default=[],
                    help="also run the qnbd of this source tree")
    ap.add_argument("--no-qemu", action="store_true", help="qnbd servers only")
    ap.add_argument("--profile", metavar="DIR")
    ap.add_argument("--disk-dir", default="/var/tmp")
    args = ap.parse_args()
    jobs = args.jobs.split(",")
    servers = [("qnbd", None)] + [("qnbd-base", os.path.abspath(t)) for t in args.tree]
    if not args.no_qemu:
        servers.append(("qemu-nbd", None))
    names = ["qnbd"] + [f"qnbd:{os.path.basename(t.rstrip('/'))}" for t in args.tree] + \
        ([] if args.no_qemu else ["qemu-nbd"])
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    work = tempfile.mkdtemp(prefix="qnbd-cpu-", dir="/dev/shm")
    disk_work = None
    try:
        images = bench.make_images(work)
        if any(bench.JOBS[j][1] == "disk" for j in jobs):
            disk_work = tempfile.mkdtemp(prefix="qnbd-cpu-", dir=args.disk_dir)
            images["disk"] = bench.make_disk_image(disk_work)
        results = {j: {n: [] for n in names} for j in jobs}
        loads = [os.getloadavg()[0]]
        for r in range(args.rounds):
            order = list(range(len(servers)))
            order = order[r % len(order):] + order[:r % len(order)]
            for job in jobs:
                for i in order:
                    kind, tree = servers[i]
                    results[job][names[i]].append(
                        run(kind, tree, job, work, images, args.profile if r == 0 else None))
                loads.append(os.getloadavg()[0])
        print(f"load average (1 min): {min(loads):.1f}-{max(loads):.1f}, "
              f"median {statistics.median(loads):.1f}")
        for job in jobs:
            unit = "us/MiB" if job.startswith("nbdcopy") else "us/op"
            print(job)
            for name in names:
                cpu = [c for c, _ in results[job][name]]
                rate = [x for _, x in results[job][name]]
                print(f"  {name:16} CPU {statistics.median(cpu):7.1f} {unit} "
                      f"({min(cpu):.1f}-{max(cpu):.1f})   rate {statistics.median(rate):9.0f} "
                      f"({min(rate):.0f}-{max(rate):.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if disk_work:
            shutil.rmtree(disk_work, ignore_errors=True)


if __name__ == "__main__":
    main()
