"""Benchmarks for jobs_app: `python -m bench` (see `python -m bench --help`).

Sections, each comparing two sides measured in turns within one run:
  1. service: jobs_app.services.jobs against the same SQL on a plain asyncpg pool;
  2. round_trips: statements each service call sends, counted on the wire;
  3. lifecycle: enqueue -> provisioning -> 3 heartbeats -> running, against the
     machine's single-row UPDATE commit rate;
  4. http: `jobs-app serve` against a bare Litestar app running the same statements;
  5. scale: latency with 1,000 and with 1,000,000 jobs in the table;
  ...
  8. peers: enqueue -> provisioning -> running beside pgqueuer's and procrastinate's
     enqueue -> run -> complete, each round in fresh processes (bench/peers.py).
"""
