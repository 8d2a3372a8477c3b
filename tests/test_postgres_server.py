"""The private PostgreSQL fixture: a fresh database per test, a server tests may stop."""

from __future__ import annotations

import psycopg
import pytest

from tests.postgres_server import PostgresServer


def test_postgres_is_a_new_empty_database_on_a_private_port(
    postgres: str, postgres_server: PostgresServer
) -> None:
    assert f":{postgres_server.port}/" in postgres and ":5432/" not in postgres
    with psycopg.connect(postgres) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        assert tables == (0,)
        connection.execute("CREATE TABLE mine (x int)")
    assert postgres_server.create_database() != postgres


def test_postgres_server_stops_and_starts_again_with_its_data() -> None:
    server = PostgresServer()
    server.start()
    try:
        url = server.create_database()
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("CREATE TABLE kept AS SELECT 1 AS x")
        server.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=1)
        server.start()
        with psycopg.connect(url) as connection:
            assert connection.execute("SELECT x FROM kept").fetchone() == (1,)
    finally:
        server.remove()
    assert server.directory is None
