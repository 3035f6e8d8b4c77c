"""What a consistency check of an image found and repaired, as `qemu-img check` reports
it (qapi/block-core.json, ImageCheck), whatever the format. How it is shown (text, JSON,
progress) is the command's business (qnbd/commands/check.py)."""

from dataclasses import dataclass, field
from typing import Protocol

# Repair modes, as qemu-img check -r leaks|all (BdrvCheckMode).
FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS


class Progress(Protocol):
    """Where a long check reports how far it is (qnbd/commands/progress.py draws it)."""

    def add_total(self, n: int) -> None: ...

    def step(self) -> None: ...


class NoProgress:
    def add_total(self, n: int) -> None:
        pass

    def step(self) -> None:
        pass


@dataclass
class CheckResult:
    """qemu-img check's ImageCheck (qapi/block-core.json)."""
    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 1 check not completed, 2 corruptions, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0
