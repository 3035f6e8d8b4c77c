"""Issue 16.4: overwriting a compressed cluster whose descriptor points far past the image
(2^54 - 512). The old reference cannot be dropped: qemu logs one line
("qcow2_free_clusters failed: File too large"), leaks it and the flush succeeds, the image
not marked corrupt. qnbd used to fail the FLUSH with a traceback ("internal error")."""

import struct
import subprocess

import nbd

from peers import qemu_img, qemu_io
from qcow2util import read_field


def _damaged_compressed(path):
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    qemu_io(path, "qcow2", "write -c -P 0x55 0 64k")
    with open(path, "r+b") as f:
        f.seek(read_field(path, "l1_table_offset"))
        l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
        # qcow2.rst "Compressed Clusters Descriptor": with 64 KiB clusters, bits 0-53 are
        # the host offset; set them to the largest 512-aligned one.
        offset_bits = (1 << 54) - 1
        f.seek(l2)
        f.write(struct.pack(">Q", (entry & ~offset_bits) | ((1 << 54) - 512)))


def test_flush_after_overwriting_a_far_compressed_cluster(tmp_path, serve):
    path = str(tmp_path / "c.qcow2")
    _damaged_compressed(path)
    server = serve(path, "-f", "qcow2")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"\x66" * 65536, 0)
    h.flush()  # raised EIO: the release of the old range failed with a traceback
    h.pwrite(b"\x67" * 512, 65536)  # the image stays writable: not marked corrupt
    h.flush()
    h.shutdown()
    code, err = server.stop()
    assert code == 0, err
    lines = [line for line in err.splitlines() if "0x3ffffffffffe00" in line]
    assert len(lines) == 1 and "leaked" in lines[0], err
    assert "Traceback" not in err
    check = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert check.returncode == 3 and "leaked clusters" in check.stdout  # leaks only
    assert "corrupt: false" in qemu_img("info", path).stdout
    out = qemu_io(path, "qcow2", "read -P 0x66 0 64k", "read -P 0x67 64k 512")
    assert "failed" not in out.stdout + out.stderr and out.stdout.count("read ") == 2
