"""Rows of the SQL stores turned into the store's records, and WHERE clauses.

Both stores keep the same tables and columns (``_sqlite_schema``,
``_pg_schema``), payloads and details as JSON text, and read rows by column
name (``sqlite3.Row``, psycopg's ``dict_row``), so one mapping serves both.
"""

import json
from collections.abc import Mapping
from typing import Any

from bridge.store.base import Envelope, Instance, Job, JobState, Study, StudyState

Row = Mapping[str, Any]


def filters(mark: str = "?", **columns) -> tuple[str, tuple]:
    """Build a WHERE clause from the given columns whose value is not None.

    ``mark`` is the driver's parameter placeholder: ``?`` for sqlite3, ``%s``
    for psycopg.
    """
    given = [(name, value) for name, value in columns.items() if value is not None]
    if not given:
        return "", ()
    where = " AND ".join(f"{name} = {mark}" for name, _ in given)
    return f"WHERE {where}", tuple(value for _, value in given)


def study(row: Row) -> Study:
    return Study(
        ref=row["ref"],
        study_instance_uid=row["study_uid"],
        route=row["route"],
        generation=row["generation"],
        state=StudyState(row["state"]),
        instance_count=row["instance_count"],
        size_bytes=row["size_bytes"],
        first_received=row["first_received"],
        last_received=row["last_received"],
        seal_due=row["seal_due"],
        sealed_at=row["sealed_at"],
        seal_trigger=row["seal_trigger"],
        hold_reason=row["hold_reason"],
        calling_ae=row["calling_ae"],
    )


def instance(row: Row) -> Instance:
    return Instance(
        sop_instance_uid=row["sop_uid"],
        study_instance_uid=row["study_uid"],
        series_instance_uid=row["series_uid"],
        sop_class_uid=row["sop_class_uid"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
        digest=row["digest"],
        size_bytes=row["size_bytes"],
        spool_path=row["spool_path"],
        calling_ae=row["calling_ae"],
        modality=row["modality"],
        patient_id=row["patient_id"],
        received_at=row["received_at"],
        study_ref=row["study_ref"],
    )


def envelope(row: Row) -> Envelope:
    return Envelope(
        id=row["id"],
        direction=row["direction"],
        peer=row["peer"],
        path=row["path"],
        size_bytes=row["size_bytes"],
        state=row["state"],
        study_ref=row["study_ref"],
        study_instance_uid=row["study_uid"],
        instance_count=row["instance_count"],
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        details=json.loads(row["details"]),
    )


def job(row: Row) -> Job:
    return Job(
        id=row["id"],
        queue=row["queue"],
        key=row["key"],
        target=row["target"],
        payload=json.loads(row["payload"]),
        state=JobState(row["state"]),
        attempts=row["attempts"],
        not_before=row["not_before"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        last_error=row["last_error"],
    )
