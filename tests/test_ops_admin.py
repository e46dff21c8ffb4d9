"""The admin API and the CLI verbs that call it."""

from __future__ import annotations

import json
import uuid

import pytest

from bridge.cli import main
from bridge.store.base import JobState
from tests.test_ops_support import (
    ADMIN_TOKEN,
    add_arrived,
    add_dead_job,
    add_quarantined,
    add_study,
    build_bridge,
    make_config,
    served_bridge,
)


@pytest.fixture
def bridge(tmp_path):
    """A served ops app over an empty store, admin token configured."""
    yield from served_bridge(tmp_path)


def cli(bridge, monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``jmix-bridge ARGV --url <bridge>`` with the token in the environment."""
    monkeypatch.setenv("JMIX_BRIDGE_ADMIN_TOKEN", ADMIN_TOKEN)
    code = main([*argv, "--url", bridge.url])
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_api_answers_401_without_a_token(bridge):
    response = bridge.get("/admin/api/status", token=None)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_admin_api_answers_401_with_a_wrong_token(bridge):
    response = bridge.get("/admin/api/jobs", token=ADMIN_TOKEN + "x")

    assert response.status_code == 401


def test_admin_api_is_disabled_when_no_token_is_configured(tmp_path):
    bridge, served = build_bridge(tmp_path, make_config(token=""))
    try:
        response = bridge.get("/admin/api/status", token="anything")
    finally:
        served.stop()

    assert response.status_code == 403
    assert "admin API disabled" in response.json()["error"]


def test_status_summarises_queues_circuits_and_quarantine(bridge):
    add_study(bridge.store)
    add_study(bridge.store, seal=False)
    add_dead_job(bridge.store)
    add_quarantined(bridge.store, bridge.spool)

    body = bridge.get("/admin/api/status").json()

    assert body["studies_open"] == 1
    assert body["dead_letter_jobs"] == 1
    assert body["quarantined_envelopes"] == 1
    assert {"queue": "deliver", "target": "site-b"}.items() <= body["queues"][0].items()
    assert body["peers"] == [
        {"name": "site-b", "transport": "http", "circuit": "closed"}
    ]


def test_retry_moves_a_dead_job_to_ready(bridge):
    job = add_dead_job(bridge.store)

    response = bridge.request("POST", f"/admin/api/jobs/{job.id}/retry")

    assert response.status_code == 200
    after = bridge.store.get_job(job.id)
    assert after.state is JobState.READY
    assert after.attempts == 0


def test_retry_refuses_a_job_that_is_not_dead(bridge):
    add_study(bridge.store)
    job = bridge.store.list_jobs(queue="deliver")[0]

    response = bridge.request("POST", f"/admin/api/jobs/{job.id}/retry")

    assert response.status_code == 409
    assert bridge.store.get_job(job.id).state is JobState.READY


def test_jobs_filter_by_queue_and_state(bridge):
    add_study(bridge.store)
    dead = add_dead_job(bridge.store)

    body = bridge.get("/admin/api/jobs", params={"state": "dead"}).json()

    assert [j["id"] for j in body["jobs"]] == [dead.id]
    assert "payload" not in body["jobs"][0]


def test_quarantine_release_requeues_an_open_job_from_the_inbox(bridge):
    env, path = add_quarantined(bridge.store, bridge.spool)

    response = bridge.request("POST", f"/admin/api/quarantine/{env.id}/release")

    assert response.status_code == 200
    after = bridge.store.get_envelope(env.id, "in")
    assert after.state == "stored"
    assert after.path == f"inbox/{env.id}.zip"
    assert (bridge.spool / after.path).is_file() and not path.exists()
    (job,) = bridge.store.list_jobs(queue="open")
    assert job.state is JobState.READY
    assert job.payload == {"envelope_id": env.id, "sender": "site-c", "released": True}


def test_quarantine_release_of_an_unknown_envelope_answers_404(bridge):
    response = bridge.request("POST", f"/admin/api/quarantine/{uuid.uuid4()}/release")

    assert response.status_code == 404


def test_quarantine_delete_removes_the_file_and_records_the_decision(bridge):
    env, path = add_quarantined(bridge.store, bridge.spool)

    response = bridge.request("DELETE", f"/admin/api/quarantine/{env.id}")

    assert response.status_code == 200
    assert not path.exists()
    after = bridge.store.get_envelope(env.id, "in")
    assert after.state == "deleted"
    assert after.details["deleted_by"] == "operator"
    assert bridge.get("/admin/api/quarantine").json() == {"quarantine": []}


def test_studies_are_listed_by_reference_without_uids(bridge):
    study, uids = add_study(bridge.store, instances=3)

    response = bridge.get("/admin/api/studies")

    (row,) = response.json()["studies"]
    assert row["ref"] == study.ref and row["instances"] == 3
    assert row["seal_trigger"] == "quiet-period"
    assert not any(uid in response.text for uid in uids)


def test_cli_status_prints_the_queue_table(bridge, monkeypatch, capsys):
    add_study(bridge.store)

    code, out, _ = cli(bridge, monkeypatch, capsys, "status")

    assert code == 0
    assert "deliver" in out and "site-b" in out and "CIRCUIT" in out


def test_cli_retry_sends_a_dead_job_again(bridge, monkeypatch, capsys):
    job = add_dead_job(bridge.store)

    code, out, _ = cli(bridge, monkeypatch, capsys, "retry", str(job.id))

    assert code == 0
    assert f"job {job.id}" in out
    assert bridge.store.get_job(job.id).state is JobState.READY


def test_cli_jobs_json_lists_dead_jobs(bridge, monkeypatch, capsys):
    job = add_dead_job(bridge.store)

    code, out, _ = cli(bridge, monkeypatch, capsys, "jobs", "--state", "dead", "--json")

    assert code == 0
    assert [j["id"] for j in json.loads(out)["jobs"]] == [job.id]


def test_cli_quarantine_release_requeues_the_envelope(bridge, monkeypatch, capsys):
    env, _ = add_quarantined(bridge.store, bridge.spool)

    code, out, _ = cli(bridge, monkeypatch, capsys, "quarantine", "release", env.id)

    assert code == 0
    assert "stored" in out
    assert bridge.store.list_jobs(queue="open")


def test_cli_studies_lists_references(bridge, monkeypatch, capsys):
    study, _ = add_study(bridge.store)

    code, out, _ = cli(bridge, monkeypatch, capsys, "studies")

    assert code == 0
    assert study.ref in out


def test_cli_without_any_token_exits_2(bridge, monkeypatch, capsys):
    monkeypatch.delenv("JMIX_BRIDGE_ADMIN_TOKEN", raising=False)

    code = main(["status", "--url", bridge.url])

    assert code == 2
    assert "no admin token" in capsys.readouterr().err


def test_cli_with_a_wrong_token_exits_1(bridge, monkeypatch, capsys):
    code = main(["status", "--url", bridge.url, "--token", "wrong"])

    assert code == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_studies_say_whether_their_envelopes_arrived(bridge):
    arrived, _ = add_study(bridge.store)
    add_arrived(bridge.store, arrived)
    waiting, _ = add_study(bridge.store)

    body = bridge.get("/admin/api/studies").json()

    by_ref = {s["ref"]: s for s in body["studies"]}
    assert by_ref[arrived.ref]["arrived"] is True
    assert by_ref[arrived.ref]["delivery"] == "site-b arrived (2 stored)"
    assert by_ref[waiting.ref]["arrived"] is False
    assert by_ref[waiting.ref]["envelopes"] == []
