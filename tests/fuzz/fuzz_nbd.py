"""atheris harness for the sans-I/O NBD code (not part of the test suite).

    .venv/bin/pip install -e '.[fuzz]'
    cd tests && ../.venv/bin/python -m fuzz.fuzz_nbd -max_total_time=600 fuzz/corpus-nbd

Runs the targets of tests/fuzz/targets.py (handshake in the three TLS modes, request
parser and transmission core, both header forms) on coverage-guided inputs; a failed property or an unexpected exception stops the
run with the input saved as crash-*. Add such inputs to a hypothesis @example or to
tests/corpus/ once fixed.
"""

import sys

import atheris

with atheris.instrument_imports(include=["qnbd"]):
    from fuzz import targets


def one_input(data: bytes) -> None:
    targets.handshake(data)
    targets.requests(data)
    targets.transmission(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
