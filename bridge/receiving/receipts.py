"""Delivery receipts: the receiving site tells the sender its study reached the PACS.

When every forward job of an envelope is done, the receiving node signs a
small JSON document with its Ed25519 signing key (a compact JWS, ``kid`` its
fingerprint) and POSTs it to the sender at ``/api/jmix/{id}/receipt``. The
sender accepts it only when the signature verifies against the signing key it
pins for the peer the envelope went to, and then shows the envelope as
"arrived at the PACS", not only "handed to the peer". A receipt carries the
envelope id, counts and a time: no patient data and no UIDs.

The format (``docs/exchange.md``)::

    {"type": "jmix-bridge.delivery-receipt", "version": 1,
     "envelope_id": "<uuid>", "receiver": "<our node id>",
     "delivered": 412, "refused": 0, "destinations": 1,
     "timestamp": "2026-12-03T18:00:00Z"}
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.errors import EnvelopeError, SchemaViolation, SpoolError, VerificationFailed
from bridge.jmix import TrustStore
from bridge.jmix.jws import sign_compact, verify_compact
from bridge.spool import validate_envelope_id
from bridge.store import Job, JobState, Store
from bridge.workers.base import JobContext, Outcome

logger = logging.getLogger(__name__)

RECEIPT_TYPE = "jmix-bridge.delivery-receipt"
ARRIVED = "arrived"  # outgoing envelope state once the receipt is in
MAX_RECEIPT_BYTES = 64 * 1024
_FIELDS = {
    "type",
    "version",
    "envelope_id",
    "receiver",
    "delivered",
    "refused",
    "destinations",
    "timestamp",
}

# Posts a signed receipt for an envelope to a sender; raises TransportError.
ReceiptPoster = Callable[[str, str, bytes], None]  # (sender name, envelope id, jws)


def build_receipt(
    envelope_id: str,
    receiver_id: str,
    delivered: int,
    refused: int,
    destinations: int,
    key: Ed25519PrivateKey,
    now: datetime | None = None,
) -> bytes:
    """Return a signed delivery receipt (compact JWS)."""
    moment = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {
        "type": RECEIPT_TYPE,
        "version": 1,
        "envelope_id": envelope_id,
        "receiver": receiver_id,
        "delivered": delivered,
        "refused": refused,
        "destinations": destinations,
        "timestamp": moment,
    }
    return sign_compact(json.dumps(doc, sort_keys=True).encode(), key)


def read_receipt(jws: bytes, trust: TrustStore) -> tuple[dict, str]:
    """Verify a receipt against pinned keys; return (document, signer fingerprint).

    Raises a VerificationFailed subclass when the signature does not verify or
    the signer is not pinned, and SchemaViolation when the document is not a
    receipt.
    """
    if len(jws) > MAX_RECEIPT_BYTES:
        raise SchemaViolation(
            f"receipt: {len(jws)} bytes, at most {MAX_RECEIPT_BYTES} expected"
        )
    payload, signer = verify_compact(jws, trust)
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise SchemaViolation("receipt: payload is not JSON") from exc
    if not isinstance(doc, dict) or set(doc) != _FIELDS or doc["type"] != RECEIPT_TYPE:
        raise SchemaViolation(f"receipt: expected the keys {sorted(_FIELDS)}")
    for name in ("delivered", "refused", "destinations"):
        if not isinstance(doc[name], int) or doc[name] < 0:
            raise SchemaViolation(
                f"receipt.{name}: expected a count, got {doc[name]!r:.20}"
            )
    validate_envelope_id(str(doc["envelope_id"]))
    return doc, signer


class ReceiptSender:
    """The ``receipt`` job handler: send one receipt once all forwarding is done.

    Each finished forward job queues a receipt job; the handler sends only when
    no forward job of the envelope is still pending, so the receipt counts
    every destination. Two destinations that finish together may both send:
    the sender records the later receipt over the earlier, which is harmless.
    """

    def __init__(
        self,
        store: Store,
        receiver_id: str,
        key: Ed25519PrivateKey,
        post: ReceiptPoster,
    ):
        self.store = store
        self.receiver_id = receiver_id
        self.key = key
        self.post = post

    def __call__(self, job: Job, ctx: JobContext) -> Outcome:
        """Send the job's receipt when its envelope is fully forwarded."""
        env_id = validate_envelope_id(job.payload["envelope_id"])
        jobs = self.store.list_jobs(queue="forward", key_prefix=f"forward:{env_id}:")
        if any(j.state != JobState.DONE for j in jobs):
            return Outcome.done()  # the last forward job to finish queues another
        delivered = sum(int(j.payload.get("delivered", 0)) for j in jobs)
        refused = sum(len(j.payload.get("failed", {})) for j in jobs)
        jws = build_receipt(
            env_id, self.receiver_id, delivered, refused, len(jobs), self.key
        )
        self.post(job.payload["sender"], env_id, jws)
        logger.info(
            "delivery receipt sent envelope=%s sender=%s delivered=%d",
            env_id,
            job.payload["sender"],
            delivered,
        )
        return Outcome.done()


def add_receipt_route(app, store: Store, trust_by_peer: dict[str, TrustStore]) -> None:
    """Serve ``POST /api/jmix/{id}/receipt`` on the sending side.

    A receipt needs no bearer token: it is accepted only when it verifies
    against the signing key pinned for the peer the envelope went to, and it
    can do nothing but mark that envelope as arrived. Answers 200, 400 (not a
    receipt, or for another envelope), 403 (signature), 404 (no such envelope
    of ours) or 413 (too large).
    """
    from aiohttp import web

    async def post_receipt(request: web.Request) -> web.Response:
        env_id = request.match_info["id"]
        if (request.content_length or 0) > MAX_RECEIPT_BYTES:
            return web.json_response({"error": "receipt too large"}, status=413)
        body = await request.content.read(MAX_RECEIPT_BYTES + 1)
        if len(body) > MAX_RECEIPT_BYTES:
            return web.json_response({"error": "receipt too large"}, status=413)
        status, answer = await asyncio.to_thread(
            record_receipt, store, trust_by_peer, env_id, body
        )
        return web.json_response(answer, status=status)

    app.router.add_post("/api/jmix/{id}/receipt", post_receipt)


def record_receipt(
    store: Store, trust_by_peer: dict[str, TrustStore], env_id: str, body: bytes
) -> tuple[int, dict]:
    """Check a receipt for outgoing envelope ``env_id`` and record it.

    Returns the HTTP status and answer of :func:`add_receipt_route`.
    """
    try:
        env_id = validate_envelope_id(env_id)
    except SpoolError:
        return 404, {"error": "no such envelope"}
    env = store.get_envelope(env_id, "out")
    if env is None:
        return 404, {"error": "no such envelope"}
    trust = trust_by_peer.get(env.peer)
    if trust is None:
        return 403, {"error": "no signing key is pinned for this peer"}
    try:
        doc, signer = read_receipt(body, trust)
    except VerificationFailed:
        return 403, {"error": "receipt verification failed"}
    except EnvelopeError as exc:
        return 400, {"error": str(exc)}
    if doc["envelope_id"] != env_id:
        return 400, {"error": "the receipt is for another envelope"}
    details = {**env.details, "receipt": doc, "receipt_signer": signer}
    store.set_envelope_state(env_id, "out", ARRIVED, details=details)
    logger.info(
        "delivery receipt recorded envelope=%s peer=%s delivered=%d refused=%d",
        env_id,
        env.peer,
        doc["delivered"],
        doc["refused"],
    )
    return 200, {"id": env_id, "status": "recorded"}
