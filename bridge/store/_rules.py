"""What the SQLite and PostgreSQL stores decide alike, kept apart from their SQL.

Each store reads and writes its own way (locks, placeholders, upserts); the
decisions themselves live here once so that the two cannot drift apart.
"""

import secrets
from typing import Any

from bridge.store._rows import Row
from bridge.store.base import DuplicatePolicy, InstanceOutcome, StudyState

# Outgoing envelope states that mean the peer has it: delivered, and arrived at
# the peer's PACS (a signed receipt came back).
DELIVERED = ("delivered", "arrived")


def new_study_ref() -> str:
    """Return a fresh opaque study reference (never derived from a UID)."""
    return "st-" + secrets.token_hex(6)


def judge_instance(
    known: Row | None, digest: str, duplicates: DuplicatePolicy
) -> InstanceOutcome:
    """Decide what an arriving instance is, given the newest record of its UID.

    ``known`` is that record with its study's state as ``study_state``, or
    None. The same bytes again are a DUPLICATE whatever the study's state;
    other bytes are a CONFLICT under the reject policy, else they REPLACE the
    record of an open study or are STORED in the follow-up of a closed one
    (see :meth:`bridge.store.base.Store.add_instance`).
    """
    if known is None:
        return InstanceOutcome.STORED
    if known["digest"] == digest:
        return InstanceOutcome.DUPLICATE
    if duplicates == DuplicatePolicy.REJECT:
        return InstanceOutcome.CONFLICT
    if known["study_state"] == StudyState.OPEN:
        return InstanceOutcome.REPLACED
    return InstanceOutcome.STORED


def with_commitment(
    details: dict[str, Any],
    transaction_uid: str,
    destination: str,
    state: str,
    failed: int,
) -> dict[str, Any]:
    """Return envelope details showing one destination's storage commitment."""
    shown = dict(details.get("storage_commitment", {}))
    shown[destination] = {
        "state": state,
        "transaction_uid": transaction_uid,
        "failed": failed,
    }
    return {**details, "storage_commitment": shown}
