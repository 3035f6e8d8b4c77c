"""What a consistency check of an image found and repaired, as `qemu-img check` reports
it (qapi/block-core.json, ImageCheck), whatever the format. How it is shown (text, JSON,
progress) is the command's business (qnbd/commands/check.py)."""

# Repair modes, as qemu-img check -r leaks|all (BdrvCheckMode).
FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS


# Plain classes, no dataclass or typing.Protocol: `qnbd check` imports this module, and
# those imports would cost its start-up more than checking a sparse image (issue 17).

class Progress:
    """Where a long check reports how far it is: this one reports nowhere;
    qnbd/commands/progress.py draws a bar."""

    def add_total(self, n: int) -> None:
        pass

    def step(self) -> None:
        pass


class CheckResult:
    """qemu-img check's ImageCheck (qapi/block-core.json)."""

    def __init__(self, filename: str, format: str = "qcow2"):
        self.filename = filename
        self.format = format
        self.check_errors = 0
        self.corruptions = 0
        self.leaks = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.image_end_offset = 0
        self.total_clusters = 0
        self.allocated_clusters = 0
        self.fragmented_clusters = 0
        self.compressed_clusters = 0
        self.messages: list[str] = []
        # Of `corruptions`, those in the tables that hold references (L1, L2, snapshot
        # and bitmap tables) rather than in refcounts: a crash inside the dirty bit cannot
        # explain them, so an open does not repair them (docs/DESIGN.md rule 6).
        self.table_damage = 0

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 1 check not completed, 2 corruptions, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0
