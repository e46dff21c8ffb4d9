"""Delivery receipts: signed by the receiving node, checked against its pinned key."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.errors import AuthenticationFailed, SchemaViolation, UnknownSigner
from bridge.jmix import TrustStore
from bridge.jmix.jws import sign_compact
from bridge.receiving.receipts import ReceiptSender, build_receipt, read_receipt
from bridge.store import JobState, NewJob, SQLiteStore
from bridge.workers.base import Worker, WorkerSpec

ENV_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def test_receipt_round_trip_returns_counts_and_signer(key):
    jws = build_receipt(ENV_ID, "org:clinic-b", 12, 1, 2, key)

    doc, signer = read_receipt(jws, TrustStore([("org:clinic-b", key.public_key())]))

    assert (doc["envelope_id"], doc["delivered"], doc["refused"]) == (ENV_ID, 12, 1)
    assert signer.startswith("SHA256:")


def test_receipt_signed_by_an_unpinned_key_is_refused(key):
    jws = build_receipt(ENV_ID, "org:clinic-b", 1, 0, 1, key)
    other = TrustStore([("org:x", Ed25519PrivateKey.generate().public_key())])

    with pytest.raises(UnknownSigner):
        read_receipt(jws, other)


def test_receipt_with_a_changed_count_fails_authentication(key):
    head, body, sig = build_receipt(ENV_ID, "b", 1, 0, 1, key).split(b".")
    forged = sign_compact(b'{"delivered": 999}', key).split(b".")[1]

    with pytest.raises(AuthenticationFailed):
        read_receipt(
            b".".join([head, forged, sig]), TrustStore([(None, key.public_key())])
        )
    assert body != forged


def test_signed_document_that_is_not_a_receipt_is_refused(key):
    jws = sign_compact(json.dumps({"type": "something-else"}).encode(), key)

    with pytest.raises(SchemaViolation):
        read_receipt(jws, TrustStore([(None, key.public_key())]))


def test_receipt_is_sent_only_when_every_destination_is_done(tmp_path, key):
    store = SQLiteStore(tmp_path / "state.db")
    for dest in ("pacs-a", "pacs-b"):
        store.enqueue(
            NewJob(
                "forward",
                f"forward:{ENV_ID}:{dest}",
                target=dest,
                payload={"delivered": 3, "failed": {}},
            )
        )
    first = store.claim("forward", "w", 60)
    store.complete(first.id, "w")
    sent = []
    sender = ReceiptSender(
        store, "org:clinic-b", key, lambda who, env, jws: sent.append((who, env, jws))
    )
    worker = Worker(store, WorkerSpec("receipt", sender))
    payload = {"envelope_id": ENV_ID, "sender": "clinic-a"}

    store.enqueue(NewJob("receipt", f"receipt:{ENV_ID}:pacs-a", payload=payload))
    worker.run_once()
    assert sent == []

    second = store.claim("forward", "w", 60)
    store.complete(second.id, "w")
    store.enqueue(NewJob("receipt", f"receipt:{ENV_ID}:pacs-b", payload=payload))
    worker.run_once()

    assert [(who, env) for who, env, _ in sent] == [("clinic-a", ENV_ID)]
    doc, _ = read_receipt(sent[0][2], TrustStore([(None, key.public_key())]))
    assert (doc["delivered"], doc["destinations"]) == (6, 2)
    assert all(j.state == JobState.DONE for j in store.list_jobs(queue="receipt"))
