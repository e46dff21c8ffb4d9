"""What became of each instance the forwarder sent: C-STORE status classes
(PS3.4 B.2.3, PS3.7 C) and the result records :func:`~bridge.dicom.forwarder.forward`
returns."""

import enum
from dataclasses import dataclass
from pathlib import Path


class Outcome(enum.StrEnum):
    """What became of one instance."""

    DELIVERED = "delivered"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class InstanceResult:
    """The outcome of one file; ``status`` is the DIMSE status, None if none came.

    ``sop_instance_uid`` is empty when the file could not be read at all.
    ``converted`` is true when the instance went out in another transfer syntax
    than its file's.
    """

    path: Path
    sop_instance_uid: str
    outcome: Outcome
    status: int | None
    reason: str
    converted: bool = False


@dataclass(frozen=True)
class Commitment:
    """The storage commitment of one :func:`forward` call (PS3.4 Annex J).

    ``state`` is ``requested`` (the peer took the request; its answer comes
    later, on another association), ``committed``, ``failed`` or
    ``unsupported`` (the peer does not do storage commitment).
    """

    state: str
    transaction_uid: str | None = None
    failed_uids: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class ForwardResult:
    """What :func:`forward` did: one result per input file, in input order."""

    destination: str
    instances: tuple[InstanceResult, ...]
    commitment: Commitment | None
    associations: int
    seconds: float

    def by_uid(self) -> dict[str, InstanceResult]:
        """Return the results keyed by SOP Instance UID (unreadable files left out)."""
        return {r.sop_instance_uid: r for r in self.instances if r.sop_instance_uid}

    def count(self, outcome: Outcome) -> int:
        """Return how many instances ended with ``outcome``."""
        return sum(1 for r in self.instances if r.outcome is outcome)

    @property
    def converted(self) -> int:
        """How many delivered instances went out in a converted transfer syntax."""
        return sum(1 for r in self.instances if r.converted)

    @property
    def remaining(self) -> list[Path]:
        """The files worth sending again later: those with a retryable outcome."""
        return [r.path for r in self.instances if r.outcome is Outcome.RETRYABLE]


def classify_status(status: int) -> tuple[Outcome, str]:
    """Return the outcome and a reason for a C-STORE response status."""
    # PS3.4 B.2.3 Table B.2-1 and PS3.7 C.1: success and every warning mean
    # the SCP has the instance (B000 coercion, B006 elements discarded, B007
    # data set does not match SOP class; 0001/0107/0116 general warnings).
    if status == 0x0000:
        return Outcome.DELIVERED, "success"
    if status & 0xF000 == 0xB000 or status in (0x0001, 0x0107, 0x0116):
        return Outcome.DELIVERED, f"warning 0x{status:04X}"
    # Refused: out of resources (A7xx) and resource limitation (PS3.7 C.5.18)
    # describe the SCP's state, not the data set: they may clear. A cancel
    # (FE00) or a duplicate message ID (0210) cannot recur on a new association.
    if status & 0xFF00 == 0xA700 or status == 0x0213:
        return Outcome.RETRYABLE, f"refused: out of resources 0x{status:04X}"
    if status in (0xFE00, 0x0210):
        return Outcome.RETRYABLE, f"cancelled or duplicate 0x{status:04X}"
    # Error: data set does not match SOP class (A9xx) and cannot understand
    # (Cxxx) are about the data set itself: the same bytes fail again. So do
    # SOP class not supported (0122), not authorised (0124), invalid SOP
    # instance (0117) and every failure code the standard does not list.
    if status & 0xFF00 == 0xA900:
        return (
            Outcome.PERMANENT,
            f"error: data set does not match SOP class 0x{status:04X}",
        )
    if status & 0xF000 == 0xC000:
        return Outcome.PERMANENT, f"error: cannot understand 0x{status:04X}"
    return Outcome.PERMANENT, f"failure 0x{status:04X}"
