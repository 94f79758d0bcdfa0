"""Periodic jobs: one scheduler for every kind (order intake, worklist build, exports).

``triggers`` turns a job's ``cron`` or ``every_s`` into fire times (pure functions of time);
``ledger`` records every run in ``job_runs`` and keeps the lease that lets one run at a time, on one
node; ``kinds`` maps a job's ``kind`` to the function that does the work; ``scheduler`` wires them to
APScheduler in the gateway process and runs what was missed while the gateway was down, once.
"""
