"""Budget: the run's ledger of spend and the cost cap that gates every request.

Before a request is sent, `reserve` checks that what was spent so far, plus the worst case
of every request in flight, plus this request's worst case, fits under the cap; `settle`
then swaps the reservation for the call's actual cost. Reserving and settling never await,
so in one event loop no two requests can both squeeze into the last dollar. Once a
request does not fit, dispatching stops for good: later, smaller requests are refused too,
so what ran is a prefix of the plan and a resume picks up the rest.

Spend counts what may have been billed, not only what surely was: a call answered without
a price counts at its worst case, and a call lost after sending (read timeout, dropped
connection) counts at its worst case as "possibly paid". The cap is therefore never
exceeded by actual spend, as long as the price book's worst case bounds a call's cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from imagebatch.tasks.cost import CostPlan
from imagebatch.tasks.journal import ImageRecord

ZERO = Decimal(0)


class CapReached(Exception):
    """This request may not be sent: `stops` says whether dispatching stops with it."""

    def __init__(self, reason: str, stops: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stops = stops


@dataclass
class Reservation:
    worst: Decimal
    open: bool = True


def money(amount: Decimal) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


class Budget:
    def __init__(
        self,
        max_cost: Decimal | None = None,
        max_cost_total: Decimal | None = None,
        folder_spent: Decimal = ZERO,
    ) -> None:
        """`max_cost` caps this run; `max_cost_total` caps the folder, counting `folder_spent`
        (what earlier runs into it spent)."""
        self.max_cost = max_cost
        self.max_cost_total = max_cost_total
        self.folder_spent = folder_spent
        self.spent = ZERO  # actual cost of answered calls, priced from the response
        self.unpriced = ZERO  # answered calls the price book cannot price: their worst case
        self.unpriced_calls = 0
        self.possibly_paid = ZERO  # calls lost after sending: their worst case
        self.in_flight = ZERO
        self.requests_in_flight = 0
        self.peak_requests_in_flight = 0
        self.stopped: str | None = None

    @property
    def capped(self) -> bool:
        return self.max_cost is not None or self.max_cost_total is not None

    @property
    def committed(self) -> Decimal:
        """What this run may have been billed so far."""
        return self.spent + self.unpriced + self.possibly_paid

    def _over(self, worst: Decimal) -> str | None:
        """Why one more request with this worst case would not fit, or None when it fits."""
        run = self.committed + self.in_flight + worst
        if self.max_cost is not None and run > self.max_cost:
            return f"--max-cost {money(self.max_cost)}"
        total = self.folder_spent + run
        if self.max_cost_total is not None and total > self.max_cost_total:
            return f"--max-cost-total {money(self.max_cost_total)} (this folder had spent {money(self.folder_spent)})"
        return None

    def reserve(self, worst: Decimal | None, what: str) -> Reservation:
        """Book a request's worst case before it is sent, or raise CapReached."""
        if self.capped:
            if self.stopped:
                raise CapReached(f"cost cap: {self.stopped}")
            if worst is None:
                raise CapReached(
                    f"cost cap: no price for {what}, so a capped run cannot send it", stops=False
                )
            over = self._over(worst)
            if over is not None:
                self.stopped = (
                    f"spent {money(self.committed)} + {money(self.in_flight)} in flight + "
                    f"{money(worst)} for the next request would exceed {over}"
                )
                raise CapReached(f"cost cap: {self.stopped}")
        self.in_flight += worst or ZERO
        self.requests_in_flight += 1
        self.peak_requests_in_flight = max(self.peak_requests_in_flight, self.requests_in_flight)
        return Reservation(worst or ZERO)

    def settle(
        self,
        reservation: Reservation | None,
        actual: Decimal | None = ZERO,
        *,
        lost: bool = False,
    ) -> None:
        """Swap the reservation for what the call cost: `actual` (None: answered but unpriced,
        counted at its worst), or its worst case as possibly paid when the answer was `lost`.
        An error answer costs nothing: settle with the default. With no reservation (a Batch
        API line booked by an earlier run, collected by this one) only a priced cost counts."""
        if reservation is None:
            self.spent += actual or ZERO
            return
        if not reservation.open:
            return
        reservation.open = False
        self.in_flight -= reservation.worst
        self.requests_in_flight -= 1
        if lost:
            self.possibly_paid += reservation.worst
        elif actual is None:
            self.unpriced += reservation.worst
            self.unpriced_calls += 1
        else:
            self.spent += actual

    def snapshot(self) -> dict[str, Any]:
        """For run.json: amounts as floats."""
        return {
            "max_cost": None if self.max_cost is None else float(self.max_cost),
            "max_cost_total": None if self.max_cost_total is None else float(self.max_cost_total),
            "folder_spent_before_usd": float(self.folder_spent),
            "spent_usd": float(self.spent),
            "unpriced_calls": self.unpriced_calls,
            "unpriced_worst_case_usd": float(self.unpriced),
            "possibly_paid_usd": float(self.possibly_paid),
            "committed_usd": float(self.committed),
            "peak_requests_in_flight": self.peak_requests_in_flight,
            "stopped_by_cap": self.stopped,
        }


def cost_report(plan: CostPlan, budget: Budget, records: Iterable[ImageRecord]) -> dict[str, Any]:
    """The run's spend for run.json and the summary: the plan's estimate, the actual cost,
    the estimate of just the images made (to compare with their cost), what may have been
    paid twice, and the folder's total. `records`: this run's image records."""
    made = [r for r in records if r.status == "succeeded"]
    # Like with like: images that have both an estimate and a price.
    both = [r for r in made if r.estimated_usd is not None and r.cost_usd is not None]
    return {
        "currency": "USD",
        "plan": plan.as_dict(),
        # Live calls and collected Batch API lines both settle in the budget.
        "actual_usd": float(budget.spent),
        "images_compared": len(both),
        "estimated_usd_of_made": sum(r.estimated_usd or 0.0 for r in both),
        "actual_usd_of_made": sum(r.cost_usd or 0.0 for r in both),
        "unestimated_images": sum(1 for r in made if r.estimated_usd is None),
        "unpriced_images": sum(1 for r in made if r.cost_usd is None),
        "possibly_paid_twice_images": sum(r.ambiguous_retries for r in records),
        "folder_spent_usd": float(budget.folder_spent + budget.committed),
        **budget.snapshot(),
    }
