"""The receiver's governance checks: requester, attestation, key_reference.

Each check returns a record for ``OpenedEnvelope.governance`` and applies its
policy (docs/governance.md section 5): ``required`` refuses an absent or
failing element, ``verified-if-present`` refuses a failing one, ``ignored``
never refuses but still records what it could check, as a warning. All of them
need only the manifest, so they run with the sender checks, before any
payload byte is decrypted.
"""

from collections.abc import Callable

from bridge.errors import (
    AuthenticationFailed,
    ExpiredAssertion,
    PolicyViolation,
    UnknownSigner,
    VerificationFailed,
)

from ._assertion import assertion_key, verify_assertion
from ._codec import parse_time, utc_now
from .attestation import verify_attestation
from .keys import fingerprint
from .request import REQUESTER_REQUIRED_FIELDS
from .trust import OpenPolicy, Pin, TrustStore

Record = dict


def _apply(
    name: str,
    policy: str,
    check: Callable[[], Record],
    present: bool,
    warnings: list[str],
) -> Record:
    """Run ``check`` under ``policy``; return its record or raise."""
    if not present:
        if policy == "required":
            raise PolicyViolation(f"{name}: absent, and the policy requires one")
        return {"status": "absent"}
    try:
        return check()
    except VerificationFailed as exc:
        if policy != "ignored":
            if isinstance(exc, AuthenticationFailed):
                raise AuthenticationFailed(stage=exc.stage) from None
            raise
        reason = str(exc)
        warnings.append(f"{name} not verified ({type(exc).__name__}: {reason})")
        return {"status": "failed", "reason": reason}


def _requester(manifest: dict, policy: OpenPolicy) -> Record:
    requester = manifest["requester"]
    assertion = requester.get("assertion")
    if assertion is None:
        raise PolicyViolation("requester: carries no assertion")
    try:
        public = assertion_key(assertion, "requester.assertion")
    except AuthenticationFailed:
        raise AuthenticationFailed(stage="requester") from None
    fp = fingerprint(public)
    pin = (policy.requester_trust or TrustStore()).lookup(fp)
    if pin is None:
        raise UnknownSigner(f"requester signing key {fp} is not pinned")
    if pin.sender_id is not None and pin.sender_id != requester["id"]:
        raise UnknownSigner(
            f"requester signing key {fp} is pinned for {pin.sender_id!r}, "
            f"not for {requester['id']!r}"
        )
    try:
        verify_assertion(manifest, pin.public_key, "requester")
    except AuthenticationFailed:
        raise AuthenticationFailed(stage="requester") from None
    missing = set(REQUESTER_REQUIRED_FIELDS) - set(assertion["signed_fields"])
    if missing:
        raise PolicyViolation(
            f"the requester assertion does not bind {', '.join(sorted(missing))}"
        )
    expires = assertion.get("expires_at")
    if (
        expires
        and parse_time(expires, "requester.assertion.expires_at") < utc_now()
        and policy.expiry == "reject"
    ):
        raise ExpiredAssertion(f"the requester assertion expired at {expires}")
    return {"status": "verified", "id": requester["id"], "fingerprint": fp}


def _attestation(manifest: dict, policy: OpenPolicy) -> Record:
    assertion = manifest["sender"]["assertion"]
    attestation = assertion["directory_attestation"]
    if not policy.directory_trust:
        raise UnknownSigner(
            "directory_attestation: no directory keys are configured to check it"
        )
    checked = verify_attestation(
        attestation,
        subject=manifest["sender"]["id"],
        public_key=assertion_key(assertion),
        directory_trust=policy.directory_trust,
        key_reference=assertion.get("key_reference"),
    )
    return checked.as_json()


def _key_reference(manifest: dict, pin: Pin | None) -> Record:
    stated = manifest["sender"]["assertion"].get("key_reference")
    pinned = pin.key_reference if pin is not None else None
    if pinned is None:
        raise PolicyViolation(
            f"sender.assertion.key_reference: {stated!r} cannot be checked, "
            "no reference is pinned for the signing key"
        )
    if stated != pinned:
        raise PolicyViolation(
            f"sender.assertion.key_reference: expected {pinned!r} (pinned), "
            f"got {stated!r}"
        )
    return {"status": "verified", "reference": stated}


def check_governance(
    manifest: dict, pin: Pin | None, policy: OpenPolicy, warnings: list[str]
) -> dict:
    """Run the requester, attestation and key_reference checks of ``manifest``.

    ``pin`` is the sender's verified pin (None under transport trust when the
    signature did not verify). Returns ``{element: record}``; raises a
    VerificationFailed subclass when a policy refuses.
    """
    assertion = manifest["sender"].get("assertion") or {}
    records = {
        "requester": _apply(
            "requester assertion",
            policy.requester,
            lambda: _requester(manifest, policy),
            "requester" in manifest,
            warnings,
        )
    }
    attestation_policy = policy.attestation_policy
    present = "directory_attestation" in assertion
    if present and attestation_policy == "ignored" and not policy.directory_trust:
        records["attestation"] = {
            "status": "not-checked",
            "provider": assertion["directory_attestation"]["provider"],
        }
    else:
        records["attestation"] = _apply(
            "directory attestation",
            attestation_policy,
            lambda: _attestation(manifest, policy),
            present,
            warnings,
        )
    stated = assertion.get("key_reference")
    if (
        stated is not None
        and policy.key_reference != "required"
        and (pin is None or pin.key_reference is None)
    ):
        # Nothing pinned to compare with: recorded, as the sender wrote it.
        records["key_reference"] = {"status": "not-checked", "reference": stated}
    else:
        records["key_reference"] = _apply(
            "key_reference",
            policy.key_reference,
            lambda: _key_reference(manifest, pin),
            stated is not None,
            warnings,
        )
    return records
