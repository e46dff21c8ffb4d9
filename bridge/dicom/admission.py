"""Who may associate with the listener, and what each association may do.

The listener lets in two kinds of caller, each from a configured list: those
allowed to store (modalities, a local PACS sending studies out) and those
allowed to report storage commitment results (the PACS the bridge forwards to,
PS3.4 J.3.3). One caller may be both. An association gets the presentation
contexts of what its caller may do, decided before negotiation; see
:class:`AdmissionSwitch` for how storage is limited per association.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

logger = logging.getLogger(__name__)

# The SOP classes a storage commitment report association needs (PS3.4 J.3.3);
# a proposal of anything else is taken as an attempt to store.
_REPORT_CLASSES = frozenset({Verification, StorageCommitmentPushModel})


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title allowed in, optionally only from one host.

    ``host`` is an IP address or a name resolved when the listener starts;
    empty allows any host.
    """

    ae_title: str
    host: str = ""


class Callers:
    """A list of allowed callers, each host resolved once, when built."""

    def __init__(self, callers: tuple[AllowedCaller, ...]):
        self._hosts = _allowed_hosts(callers)

    def __bool__(self) -> bool:
        return bool(self._hosts)

    def refusal(self, calling: str, host: str) -> str:
        """Return "calling-ae" or "host" when the list does not let the caller
        in, "" when it does."""
        if calling not in self._hosts:
            return "calling-ae"
        hosts = self._hosts[calling]
        if hosts is not None and host not in hosts:
            return "host"
        return ""


@dataclass(frozen=True)
class Admission:
    """What an accepted association may do, decided before negotiation."""

    store: bool
    report: bool


# What an association that was not admitted may do.
NOTHING = Admission(store=False, report=False)


class AdmissionSwitch:
    """pynetdicom's ``UNRESTRICTED_STORAGE_SERVICE``, decided per association.

    pynetdicom reads that process-wide switch, for its truth value only, in the
    association's own thread: when it negotiates the presentation contexts
    (acse.py) and when it picks the service class of a C-STORE (association.py).
    Our ``EVT_REQUESTED`` handler runs in that thread just before negotiation,
    so a thread-local value lets every storage SOP class in for a caller allowed
    to store and none for a caller that may only report storage commitment:
    their storage contexts are then refused as any unsupported abstract syntax
    is (PS3.8 9.3.3.2, result 3).
    """

    def __init__(self):
        self._local = threading.local()

    def admit(self, admission: Admission) -> None:
        """Set what the calling thread's association may do."""
        self._local.admission = admission

    @property
    def admission(self) -> Admission:
        """What the calling thread's association may do; nothing when unset."""
        return getattr(self._local, "admission", NOTHING)

    def __bool__(self) -> bool:
        return self.admission.store


def _allowed_hosts(
    callers: tuple[AllowedCaller, ...],
) -> dict[str, frozenset[str] | None]:
    """Map each allowed AE title to its allowed addresses, None for any host."""
    allowed: dict[str, frozenset[str] | None] = {}
    for caller in callers:
        ae_title = caller.ae_title.strip()
        if not caller.host:
            allowed[ae_title] = None
        elif ae_title not in allowed or allowed[ae_title] is not None:
            allowed[ae_title] = (allowed.get(ae_title) or frozenset()) | _resolve(
                caller.host
            )
    return allowed


def contexts_for(admission: Admission) -> list[PresentationContext]:
    """Return the presentation contexts to offer an admitted association.

    Storage contexts are not listed: the admission switch lets them in.
    """
    contexts = [build_context(Verification)]
    if admission.report:
        # PS3.4 J.3.3 and PS3.7 D.3.3.4: the PACS that sends the N-EVENT-REPORT
        # is the SCP of Storage Commitment Push Model, so it proposes the SCP
        # role for itself in an SCP/SCU Role Selection item. An acceptor's
        # scu_role and scp_role say which of the requestor's proposed roles
        # pynetdicom agrees to; with both set, whatever the PACS proposes is
        # taken up, and a PACS proposing no role at all is let in as well.
        commitment = build_context(StorageCommitmentPushModel)
        commitment.scu_role = True
        commitment.scp_role = True
        contexts.append(commitment)
    return contexts


def proposes_storage(assoc) -> bool:
    """Return True when the association proposes anything besides verification
    and storage commitment."""
    proposed = assoc.requestor.primitive.presentation_context_definition_list
    return any(cx.abstract_syntax not in _REPORT_CLASSES for cx in proposed)


def _resolve(host: str) -> frozenset[str]:
    """Return the addresses of ``host``; the literal itself when it won't resolve."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        logger.warning("allowed caller host does not resolve host=%s", host)
        return frozenset({host})
    return frozenset({host, *(info[4][0] for info in infos)})
