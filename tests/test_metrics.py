"""Metrics (issue 15): `--metrics ADDR:PORT` (Prometheus text) and the control socket's
`metrics` (JSON) agree with what a libnbd client counted, scraped during its load and
after it."""

import os
import socket
import threading
import time
import urllib.request

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctlutil import ControlClient, control_path
from images import MiB
from nbdserver import (RawClient, Server, connect, make_raw, recv_exactly, run_serve,
                       short_tmpdir, wait_for_socket)
from peers import qemu_img, qemu_io

SIZE = 16 * MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(metric sample name, frozenset(labels)): value}"""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def test_metrics_agree_with_the_client_during_and_after_load(tmp_path, serve):
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    port, path = free_port(), control_path()
    server = serve(img, "-x", "disk", "--metrics", f"127.0.0.1:{port}", "--control", path)
    h = connect(server.uri_for("disk"))
    h.set_strict_mode(0)   # let a bad request reach the server, to be counted as an error
    counts = {"read": 0, "write": 0, "write_zeroes": 0, "flush": 0}
    nbytes = dict.fromkeys(counts, 0)
    stop = threading.Event()
    done_iterations = []

    def load():
        i = 0
        while not stop.is_set() or i < 200:
            off = (i * 7919 * 4096) % (SIZE - 65536)
            h.pwrite(bytes([i % 251]) * 4096, off)
            counts["write"] += 1
            nbytes["write"] += 4096
            h.pread(8192, off)
            counts["read"] += 1
            nbytes["read"] += 8192
            if i % 10 == 0:
                h.zero(65536, off)
                counts["write_zeroes"] += 1
                nbytes["write_zeroes"] += 65536
                h.flush()
                counts["flush"] += 1
            i += 1
        done_iterations.append(i)

    t = threading.Thread(target=load)
    t.start()
    previous = 0
    try:
        for _ in range(5):   # scraped while the load runs: never behind what it saw before
            samples = scrape(port)
            writes = value(samples, "qnbd_requests_total", export="disk", command="write")
            assert writes >= previous
            previous = writes
            assert value(samples, "qnbd_clients", export="disk") == 1
    finally:
        stop.set()
        t.join()
    assert done_iterations
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, SIZE)             # past the end: EINVAL from the server
    assert e.value.errno == "EINVAL"
    samples = scrape(port)
    for command, n in counts.items():
        extra = 1 if command == "read" else 0   # the refused read
        assert value(samples, "qnbd_requests_total", export="disk", command=command) == n + extra
        assert value(samples, "qnbd_request_bytes_total", export="disk",
                     command=command) == nbytes[command] + 4096 * extra
        assert value(samples, "qnbd_request_duration_seconds_count", export="disk",
                     command=command) == n + extra
        assert value(samples, "qnbd_request_duration_seconds_bucket", export="disk",
                     command=command, le="+Inf") == n + extra
    assert value(samples, "qnbd_errors_total", export="disk", errno="EINVAL") == 1
    # The same numbers as JSON through the control socket.
    c = ControlClient(path)
    metrics = c.call("metrics")["result"]
    disk = metrics["exports"]["disk"]
    assert disk["clients"] == 1 and disk["errors"] == {"EINVAL": 1}
    assert metrics["connections"] == value(samples, "qnbd_connections") == 1
    for command, n in counts.items():
        extra = 1 if command == "read" else 0
        assert disk["requests"][command] == n + extra
        assert disk["latency"][command]["buckets"]["+Inf"] == n + extra
    h.shutdown()
    c.close()


def test_metrics_endpoint_refuses_what_it_does_not_serve(tmp_path, serve):
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    port = free_port()
    serve(img, "--metrics", f"127.0.0.1:{port}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert e.value.code == 404
    # A head that never ends, then garbage: the server goes on answering.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"x" * 20000)
        assert s.recv(100) == b""
    assert "qnbd_clients" in urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.mark.parametrize("bad", ["nowhere", "127.0.0.1:0", "127.0.0.1:99999", ":x"])
def test_bad_metrics_address_is_one_line(tmp_path, bad):
    r = run_serve("--metrics", bad, "null-co://")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--metrics" in r.stderr


# 4 KiB clusters: a qcow2 L2 table (one cluster) maps 2 MiB, a QED one of two clusters
# (qemu refuses to open table_size=1) 4 MiB; several of them map the image.
@pytest.mark.parametrize("fmt, opts, cache, span", [
    ("qcow2", "cluster_size=4096", "l2", 2 * MiB),
    ("qed", "cluster_size=4096,table_size=2", "qed-l2", 4 * MiB)])
def test_table_cache_hits_and_misses_under_a_read_workload(tmp_path, serve, fmt, opts, cache,
                                                           span):
    img = str(tmp_path / f"disk.{fmt}")
    qemu_img("create", "-q", "-f", fmt, "-o", opts, img, str(SIZE))
    qemu_io(img, fmt, f"write -P 0x3c 0 {SIZE}")
    port, path = free_port(), control_path()
    server = serve(img, "-f", fmt, "-x", "disk", "--metrics", f"127.0.0.1:{port}",
                   "--control", path)
    c = ControlClient(path)

    def counts():
        """(hits, misses) as JSON and as Prometheus give them: always the same."""
        caches = c.call("metrics")["result"]["exports"]["disk"]["table_caches"]
        samples = scrape(port)
        both = (value(samples, "qnbd_table_cache_hits_total", export="disk", cache=cache),
                value(samples, "qnbd_table_cache_misses_total", export="disk", cache=cache))
        assert both == (caches[cache]["hits"], caches[cache]["misses"])
        if fmt == "qcow2":
            assert "refcount" in caches
        return both

    hits0, misses0 = counts()
    h = connect(server.uri_for("disk"))
    step = 256 * 1024
    reads = SIZE // step

    def read_pass():
        for off in range(0, SIZE, step):
            assert h.pread(step, off) == b"\x3c" * step

    read_pass()
    hits1, misses1 = counts()
    # The first pass reads each table once, from the image; every other lookup hits.
    assert misses1 - misses0 == SIZE // span
    assert hits1 - hits0 >= reads - SIZE // span
    read_pass()
    hits2, misses2 = counts()
    assert misses2 == misses1          # all cached now
    assert hits2 - hits1 >= reads      # each read looked its table up, and found it
    h.shutdown()
    c.close()


@pytest.mark.parametrize("structured", [False, True])
def test_latency_of_a_streamed_read_lasts_until_its_last_byte(tmp_path, structured):
    """A READ larger than one step goes out in pieces, each once the client has taken the
    one before (a reply budget of one byte): its latency ends with the last piece."""
    n = 32 * MiB
    img = make_raw(tmp_path / "d.raw", n, b"\x77" * n)   # data: no hole to skip
    d = short_tmpdir()
    sock, path = os.path.join(d, "nbd.sock"), os.path.join(d, "ctl")
    conf = tmp_path / "q.toml"
    conf.write_text(f'control = "{path}"\n[limits]\nmax_queued_bytes = 1\n'
                    f'[[listen]]\nunix = "{sock}"\n'
                    f'[[export]]\nname = "d"\nformat = "raw"\nimage = "{img}"\n')
    server = Server(["--config", str(conf)], sock)
    try:
        wait_for_socket(sock, server.proc)
        client = RawClient(sock, timeout=30)
        client.go("d", structured=structured)
        client.request(0, 0, n)   # NBD_CMD_READ of the whole export
        pause = 1.0
        time.sleep(pause)         # the server is stuck on a full socket meanwhile
        if structured:
            for _, ctype, _, _ in client.chunks():
                assert ctype in (1, 2), ctype   # OFFSET_DATA / OFFSET_HOLE
        else:
            error, _ = client.simple_reply()
            assert error == 0
            assert recv_exactly(client.s, n) == b"\x77" * n
        latency = ControlClient(path).call("metrics")["result"]["exports"]["d"]["latency"]
        assert latency["read"]["count"] == 1
        assert latency["read"]["sum"] >= pause * 0.9, latency["read"]
        client.close()
    finally:
        code, err = server.stop()
    assert code == 0, err


def test_idle_scrapers_cannot_take_the_descriptors_nbd_clients_need(tmp_path, serve):
    img = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    port = free_port()
    server = serve(img, "-x", "disk", "--metrics", f"127.0.0.1:{port}")
    idle = []
    for _ in range(300):   # connections that never send a request
        s = socket.create_connection(("127.0.0.1", port))
        idle.append(s)
    h = connect(server.uri_for("disk"))
    h.pwrite(b"z" * 4096, 0)
    assert h.pread(4096, 0) == b"z" * 4096
    assert len(os.listdir(f"/proc/{server.proc.pid}/fd")) < 100
    for s in idle:
        s.close()
    deadline = time.monotonic() + 10
    while True:   # the server notices the closed ones; then scrapes are served again
        try:
            assert value(scrape(port), "qnbd_clients", export="disk") == 1
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    h.shutdown()
