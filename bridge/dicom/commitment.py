"""Storage commitment results that a PACS sends on an association of its own.

After the forwarder's N-ACTION (PS3.4 J.3.2) a PACS such as Orthanc answers
later: it opens an association to our AE title and sends an N-EVENT-REPORT
(PS3.4 J.3.3) naming the transaction, the instances it committed and those it
could not. The listener accepts such associations when it is given a
:class:`CommitmentReports`, which records each result in the state store
against the envelope and destination the transaction was requested for.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import evt

from bridge.store import Store

logger = logging.getLogger(__name__)

# PS3.4 J.3.3: event type 1 means every instance was committed, 2 that some
# failed (FailedSOPSequence lists them).
_ALL_COMMITTED = 1
_SOME_FAILED = 2

# PS3.7 C: Success, No Such Event Type, Invalid Argument Value, Processing Failure.
_SUCCESS = 0x0000
_NO_SUCH_EVENT_TYPE = 0x0113
_INVALID_ARGUMENT = 0x0115
_PROCESSING_FAILURE = 0x0110


class CommitmentReports:
    """Records N-EVENT-REPORTs of storage commitment in the store."""

    def __init__(self, store: Store):
        self.store = store

    def handle(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """The listener's EVT_N_EVENT_REPORT handler; returns the DIMSE status."""
        try:
            return self._record(event.request.EventTypeID, event.event_information)
        except Exception as exc:  # nothing escapes a handler
            logger.error("commitment report failed error=%s", type(exc).__name__)
            return _PROCESSING_FAILURE, None

    def _record(self, event_type: int, info: Dataset) -> tuple[int, None]:
        if event_type not in (_ALL_COMMITTED, _SOME_FAILED):
            return _NO_SUCH_EVENT_TYPE, None
        uid = str(info.get("TransactionUID", ""))
        found = self.store.find_commitment(uid) if uid else None
        if found is None:
            logger.warning("commitment report for an unknown transaction")
            return _INVALID_ARGUMENT, None
        envelope_id, destination = found
        failed = len(info.get("FailedSOPSequence", []))
        state = "committed" if event_type == _ALL_COMMITTED and not failed else "failed"
        self.store.record_commitment(uid, envelope_id, destination, state, failed)
        logger.info(
            "storage commitment reported envelope=%s dest=%s state=%s failed=%d",
            envelope_id,
            destination,
            state,
            failed,
        )
        return _SUCCESS, None
