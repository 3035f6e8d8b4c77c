"""Fixtures shared by the test modules (test modules never import one another; helpers
live in the plain modules beside them: peers, images, workload, nbdserver, ...)."""

from nbdserver import serve  # noqa: F401 -- the `serve` fixture, for every module
