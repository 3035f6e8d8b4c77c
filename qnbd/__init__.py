"""qnbd: an NBD server exporting qcow2 images through its own qcow2 engine."""

__version__ = "0.1.0"
