"""--max_cost in a worker process: one ``CostBudget`` that decides for every model client.

A job that asks several models (a prompt's own model, a judge's, a re-caption's) makes one
client per model in each worker process (core/engine.py); all of them charge the same budget,
so --max_cost counts what every model's answers cost, and a stop states what each one spent.
"""

from __future__ import annotations

from beam_caption.core.errors import JobStopped


class CostBudget:
    """A worker process's share of --max_cost and what was spent against it: the dollars each
    model's answers cost (``charge``) and this process's share of what earlier runs of the job
    spent (``count_spent_before``: the captions a --resume reuses).

    Every model client of the process charges the same budget, and asks it before each request
    whether it is spent. Used from one event loop.

    Args:
        limit: this process's share of --max_cost, in dollars (None: no limit).
        worker_processes: the processes sharing the job's --max_cost (and what earlier runs
            spent).
    """

    def __init__(self, limit: float | None = None, worker_processes: int = 1):
        self.limit = limit
        self._processes = max(1, worker_processes)
        self.by_model: dict[str, float] = {}  # model -> dollars its answers cost this run
        self.reused = 0.0  # this process's share of what earlier runs spent

    def count_spent_before(self, dollars: float) -> None:
        """What earlier runs of the job spent in all (the cost of the captions a --resume
        reuses): this process's share counts against the limit. Setting it again replaces it."""
        self.reused = dollars / self._processes

    def charge(self, model: str, dollars: float) -> None:
        """Count ``dollars`` paid for an answer of ``model``."""
        self.by_model[model] = self.by_model.get(model, 0.0) + dollars

    @property
    def spent(self) -> float:
        """Dollars counted against the limit: every model's answers and the reused captions."""
        return sum(self.by_model.values()) + self.reused

    def is_spent(self) -> bool:
        """Whether nothing more may be sent: the limit is reached."""
        return self.limit is not None and self.spent >= self.limit

    def stop(self) -> JobStopped:
        """The --max_cost stop, stating what was spent when asked (asked once the requests in
        flight have ended, the whole spend): by each model when more than one was paid, and by
        the reused captions."""
        shares = [(dollars, model) for model, dollars in sorted(self.by_model.items())
                  if len(self.by_model) > 1]
        if self.reused:
            shares.append((self.reused, "the captions reused from earlier runs"))
        of_it = "".join(f", ${dollars:.4f} of it by {what}" for dollars, what in shares)
        return JobStopped(
            f"--max_cost is spent (this worker process's share: ${self.limit or 0.0:.4f}; "
            f"spent ${self.spent:.4f}{of_it}; answers in flight when it ran out were kept). "
            "Records not sent yet are left for --resume with a higher --max_cost (the captions "
            "--resume reuses count against it).")
