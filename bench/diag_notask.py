"""Diagnostic only: the imagebatch CLI with the per-job Prefect *task* layer bypassed.

    python bench/diag_notask.py run JOBS.csv --out DIR -q     (same arguments as `imagebatch`)

The flow still runs under Prefect and everything else is unchanged (limiter, retries,
store, journal, manifest); only `flows.run_jobs.process_job` is swapped, in this process,
for a call of the undecorated function `process_job.fn`. Comparing it with the real CLI
on the same workload attributes client CPU to the per-task Prefect machinery. It is not a
supported way to run imagebatch and changes nothing in the package.
"""

from __future__ import annotations

import sys

import imagebatch.flows.run_jobs as run_jobs_module
from imagebatch.tasks.dispatch import process_job

_body = process_job.fn


async def _direct(job_id, units, return_state=False):
    return await _body(job_id, units)


run_jobs_module.process_job = _direct

from imagebatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
