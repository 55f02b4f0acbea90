"""The simulator without `x-ratelimit-*` headers on its answers (bench use only).

    python bench/sim_noheaders.py --port 0 --ipm 600 ...   (same flags as python -m imagebatch.simulator)

The stock simulator announces its limits in `x-ratelimit-limit-*` / `-remaining-*` headers on
every answer, so a client "not told the limit" learns it from the first response. This
wrapper removes them, leaving only what a 429 says (status, retry-after, retry-after-ms), so
the limiter has to find the limit from 429s alone. Limits are enforced exactly as before.
"""

from __future__ import annotations

import sys

from imagebatch.simulator import limits


def _no_headers(self, rpm, ipm, window, now=None):
    return {}


limits.RateLimits.headers = _no_headers

from imagebatch.simulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
