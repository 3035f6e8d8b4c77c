"""The NBD protocol: sans-I/O handshake and transmission, and the asyncio server glue."""
