"""Fixtures shared by the test modules (test modules never import one another; helpers
live in the plain modules beside them: peers, images, workload, nbdserver, ...)."""

from nbdserver import serve, servers  # noqa: F401 -- the `serve` and `servers` fixtures
from lockutil import qemu_holder  # noqa: F401 -- a qemu process holding an image's locks
