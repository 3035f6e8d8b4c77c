"""The qcow2 engine: usable on its own, synchronous and single-threaded (see docs/DESIGN.md)."""
