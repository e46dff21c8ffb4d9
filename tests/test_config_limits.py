"""Configuration of the peer API's connection limits (issue #9, README L-35)."""

import pytest

from bridge.config import load_config
from bridge.errors import ConfigError


def test_http_connection_limits_have_bounded_defaults(tmp_path):
    path = tmp_path / "bridge.yaml"
    path.write_text("node: {id: a, name: A}\n")

    http = load_config(path, check_files=False).http

    assert 0 < http.body_idle_seconds <= 60
    assert 1 <= http.max_connections_per_client <= 64


def test_http_connection_limits_out_of_range_are_reported_with_their_paths(tmp_path):
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "node: {id: a, name: A}\n"
        "http: {body_idle_seconds: 0, max_connections_per_client: 0}\n"
    )

    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)

    problems = info.value.problems
    assert any(p.startswith("http.body_idle_seconds: expected") for p in problems)
    assert any(
        p.startswith("http.max_connections_per_client: expected at least 1, got 0")
        for p in problems
    )
