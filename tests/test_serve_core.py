"""The transmission core against a real `qnbd serve` (issue 14): large READ/WRITE with
compact headers, extended headers on the wire (raw socket here; libnbd 1.22 in
test_serve_extended.py), fairness between a flooding client and a latency-measuring one,
and the reply-buffer bound over TCP and TLS."""

import multiprocessing
import os
import socket
import ssl
import struct
import threading
import time

import nbd
import pytest

from nbdserver import RawClient, Server, make_raw, meta_payload, recv_exactly, rss, short_tmpdir
from qnbd.nbd import protocol as p
from tlsutil import make_pki

MiB = 1 << 20
GiB = 1 << 30


def _pattern(n: int, seed: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[seed:seed + n]


# --- large requests, compact headers ---

@pytest.fixture
def big(tmp_path, serve):
    image = make_raw(tmp_path / "big.raw", 160 * MiB)
    return serve(image, "-f", "raw")


@pytest.mark.parametrize("size", [48 * MiB, 64 * MiB])
def test_large_read_and_write_with_libnbd(big, size):
    """More than the 32 MiB advertised, as clients that never ask the limit send (issue 14:
    a 48 MiB WRITE used to end the session with "no matching cookie")."""
    h = nbd.NBD()
    # libnbd itself keeps to the advertised 32 MiB (STRICT_PAYLOAD from 1.16 on; before,
    # strict mode as a whole). Its other checks stay, among them STRICT_AUTO_FLAG, which
    # sets NBD_CMD_FLAG_PAYLOAD_LEN on writes when extended headers are in use.
    payload_check = getattr(nbd, "STRICT_PAYLOAD", None)
    h.set_strict_mode(h.get_strict_mode() & ~payload_check if payload_check else 0)
    h.connect_uri(big.uri)
    data = _pattern(size, 7)
    h.pwrite(data, MiB)
    assert h.pread(size, MiB) == data
    h.shutdown()


def test_oversize_requests_einval_and_session_continues(big):
    c = RawClient(big.sock, timeout=30)
    c.go()
    n = 64 * MiB + 4096
    c.request(p.CMD_WRITE, 0, n, cookie=1, payload=b"\xee" * n)
    c.request(p.CMD_READ, 0, n, cookie=2)
    c.request(p.CMD_WRITE, 0, 4, cookie=3, payload=b"ok!!")
    c.request(p.CMD_READ, 0, 4, cookie=4)
    assert c.simple_reply() == (p.EINVAL, 1)
    assert c.simple_reply() == (p.EINVAL, 2)
    assert c.simple_reply() == (0, 3)
    assert c.simple_reply() == (0, 4) and c.recv(4) == b"ok!!"
    c.close()


def test_large_read_memory_stays_bounded(big):
    """Eight pipelined 64 MiB reads, taken slowly: the server streams them in pieces."""
    c = RawClient(big.sock, timeout=30)
    c.go()
    before = rss(big.proc.pid)
    c.s.sendall(b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, i, 0, 64 * MiB)
                         for i in range(8)))
    peak = 0
    for i in range(8):
        assert c.simple_reply() == (0, i)
        recv_exactly(c.s, 64 * MiB)
        peak = max(peak, rss(big.proc.pid) - before)
    assert peak < 120 * MiB, f"server grew by {peak >> 20} MiB"
    c.close()


# --- extended headers on the wire ---

def ext_request(c, cmd, offset=0, length=0, flags=0, cookie=1, payload=b""):
    c.s.sendall(struct.pack(">IHHQQQ", p.EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset,
                            length) + payload)


def ext_reply(c):
    magic, flags, rtype, cookie, offset, n = struct.unpack(">IHHQQQ", c.recv(32))
    assert magic == p.EXTENDED_REPLY_MAGIC, hex(magic)
    return flags, rtype, cookie, offset, c.recv(n)


def ext_go(c, contexts=("base:allocation",)):
    c.greeting()
    c.send_option(p.OPT_EXTENDED_HEADERS)
    assert c.option_replies() == [(p.REP_ACK, b"")]
    c.send_option(p.OPT_SET_META_CONTEXT, meta_payload("", list(contexts)))
    assert c.option_replies()[-1][0] == p.REP_ACK
    c.send_option(p.OPT_GO, struct.pack(">IH", 0, 0))
    flags = None
    for rtype, data in c.option_replies():
        if rtype == p.REP_INFO and data[:2] == b"\0\0":
            flags = struct.unpack(">H", data[10:12])[0]
    return flags


def test_extended_headers_raw_client(tmp_path, serve):
    image = make_raw(tmp_path / "six.raw", 6 * GiB, b"head", 0)
    server = serve(image, "-f", "raw", "--discard", "unmap")
    c = RawClient(server.sock, timeout=30)
    flags = ext_go(c)
    assert flags & p.FLAG_BLOCK_STATUS_PAYLOAD and flags & p.FLAG_SEND_DF
    ext_request(c, p.CMD_WRITE, 5 * GiB, 5, p.CMD_FLAG_PAYLOAD_LEN, cookie=1, payload=b"later")
    assert ext_reply(c)[:4] == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, 1, 5 * GiB)
    # 5 GiB of zeros in one request: a 64-bit effect length.
    ext_request(c, p.CMD_WRITE_ZEROES, 0, 5 * GiB, cookie=2)
    assert ext_reply(c)[1:3] == (p.REPLY_TYPE_NONE, 2)
    ext_request(c, p.CMD_READ, 5 * GiB, 5, cookie=3)
    flags_, rtype, cookie, offset, payload = ext_reply(c)
    assert (rtype, cookie, offset, payload) == (p.REPLY_TYPE_OFFSET_DATA, 3, 5 * GiB,
                                                struct.pack(">Q", 5 * GiB) + b"later")
    ext_request(c, p.CMD_BLOCK_STATUS, 0, 6 * GiB, cookie=4)
    flags_, rtype, cookie, offset, payload = ext_reply(c)
    assert rtype == p.REPLY_TYPE_BLOCK_STATUS_EXT and flags_ & p.REPLY_FLAG_DONE
    cid, count = struct.unpack_from(">II", payload)
    first = struct.unpack_from(">QQ", payload, 8)
    assert count >= 2 and first[0] >= 4 * GiB and first[1] == 3   # HOLE|ZERO
    # The payload form: context ids and a 64-bit effect length.
    body = struct.pack(">QI", 6 * GiB, cid)
    ext_request(c, p.CMD_BLOCK_STATUS, 0, len(body), p.CMD_FLAG_PAYLOAD_LEN, cookie=5, payload=body)
    assert ext_reply(c)[4] == payload
    body = struct.pack(">QI", 6 * GiB, cid + 7)
    ext_request(c, p.CMD_BLOCK_STATUS, 0, len(body), p.CMD_FLAG_PAYLOAD_LEN, cookie=6, payload=body)
    flags_, rtype, cookie, offset, err = ext_reply(c)
    assert rtype == p.REPLY_TYPE_ERROR and struct.unpack(">I", err[:4])[0] == p.EINVAL
    ext_request(c, p.CMD_DISC, cookie=7)
    assert c.closed_by_server()


# --- fairness ---

def _flood(path: str, cmd: int, size: int, stop, counter):
    """Pipelined requests as fast as the server answers, replies read and dropped. Runs in
    a process of its own, so the measuring client shares no interpreter with it."""
    c = RawClient(path, timeout=30)
    c.go()
    sink = bytearray(4 * MiB)
    # As many requests as one socket read takes (256 KiB): the server sees them at once.
    offset = 64 * MiB if cmd == p.CMD_WRITE_ZEROES else 0   # away from the data read
    batch = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, cmd, 1, offset, size) * 9362

    def send():
        try:
            while not stop.is_set():
                c.s.sendall(batch)
        except OSError:
            pass
    sender = threading.Thread(target=send)
    sender.start()
    try:
        while not stop.is_set():
            n = c.s.recv_into(sink)
            with counter.get_lock():
                counter.value += n
    except OSError:
        pass
    c.s.shutdown(socket.SHUT_RDWR)
    sender.join()
    c.close()


def test_flooding_clients_cost_others_milliseconds(tmp_path, serve):
    """Issue 14: clients flooding pipelined requests (large reads: work per request; small
    reads and zero writes: many requests per socket read, the zero writes with 16-byte
    replies that never fill the reply budget) delay another client's requests by
    milliseconds."""
    image = make_raw(tmp_path / "f.raw", 128 * MiB, b"\x42" * (64 * MiB))
    server = serve(image, "-f", "raw", "-e", "0")
    mp = multiprocessing.get_context("fork")
    stop = mp.Event()
    received = mp.Value("q", 0)
    floods = [mp.Process(target=_flood, args=(server.sock, cmd, size, stop, received))
              for cmd, size in ((p.CMD_READ, 8 * MiB), (p.CMD_READ, 4096),
                                (p.CMD_WRITE_ZEROES, 65536), (p.CMD_WRITE_ZEROES, 65536))]
    for flood in floods:
        flood.start()
    rounds = []
    try:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        time.sleep(0.5)
        assert received.value, "the flood is not running"
        # Up to three rounds of 200 reads: on a loaded 2-core machine the scheduler alone
        # can cost a round tens of milliseconds; an unfair server loses every round
        # (p99 118 ms before the per-turn bound, on an idle machine).
        for _ in range(3):
            latencies = []
            for i in range(200):
                start = time.perf_counter()
                assert h.pread(4096, (i * 4096) % (64 * MiB)) == b"\x42" * 4096
                latencies.append(time.perf_counter() - start)
            latencies.sort()
            rounds.append((latencies[int(len(latencies) * 0.99) - 1], latencies[-1]))
            if rounds[-1][0] < 0.050:
                break
        flooded = received.value
        h.shutdown()
    finally:
        stop.set()
        for flood in floods:
            flood.join(10)
            flood.kill()
    assert flooded > 128 * MiB, "the flood was not served meanwhile"
    shown = ", ".join(f"p99 {p * 1000:.1f} ms (max {m * 1000:.1f})" for p, m in rounds)
    print(f"fairness: {shown}, flood {flooded >> 20} MiB")
    assert min(p for p, _ in rounds) < 0.050, shown


# --- the reply-buffer bound, over TCP and TLS ---

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")), {"alice": "/CN=alice"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_reader_that_does_not_read_cannot_grow_the_server(tmp_path, pki, transport):
    image = make_raw(tmp_path / "a.raw", 32 * MiB, b"edge", 32 * MiB - 4)
    port = _free_port()
    conf = tmp_path / "q.toml"
    tls = f'[tls]\ncreds = "{pki["server"]}"\n' if transport == "tls" else ""
    conf.write_text(f'[limits]\nmax_queued_bytes = 16777216\n{tls}'
                    f'[[listen]]\naddress = "127.0.0.1"\nport = {port}\n'
                    f'[[export]]\nimage = "{image}"\nformat = "raw"\n')
    server = Server(["--config", conf], os.path.join(short_tmpdir(), "unused"))
    try:
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                assert server.proc.poll() is None, server.proc.stderr.read()
                time.sleep(0.05)
        c = RawClient.__new__(RawClient)
        c.s = s
        c.greeting()
        if transport == "tls":
            c.send_option(p.OPT_STARTTLS)
            assert c.option_replies() == [(p.REP_ACK, b"")]
            ctx = ssl.create_default_context(cafile=os.path.join(pki["alice"], "ca-cert.pem"))
            ctx.check_hostname = False
            # Python 3.13 rejects the test CA (no keyUsage extension) in strict mode.
            ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
            ctx.load_cert_chain(os.path.join(pki["alice"], "client-cert.pem"),
                                os.path.join(pki["alice"], "client-key.pem"))
            c.s = ctx.wrap_socket(s)
        c.send_option(p.OPT_GO, struct.pack(">IH", 0, 0))
        assert not c.option_replies()[-1][0] & (1 << 31)
        before = rss(server.proc.pid)
        count = 12   # 384 MiB of replies asked for at once
        c.s.sendall(b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, i, 0,
                                         32 * MiB) for i in range(count)))
        time.sleep(1.5)
        grown = rss(server.proc.pid) - before
        assert grown < 64 * MiB, f"server grew by {grown >> 20} MiB"
        for i in range(count):  # and every reply still comes, in order
            assert c.simple_reply() == (0, i)
            assert recv_exactly(c.s, 32 * MiB)[-4:] == b"edge"
        c.close()
    finally:
        server.stop()
