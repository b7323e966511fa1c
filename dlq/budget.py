"""The dead-letter budget: a stage that dead-letters too much stops instead.

When a schema change or a broken dependency makes every record fail, a stage that
keeps dead-lettering turns the whole stream into dead letters that someone must
redrive. The budget stops it first: the worker stops consuming, reports
unhealthy and says why; the offsets of the batch that tripped it are not
committed, so once the cause is fixed a restart carries on from there.

Outcomes are counted per input record, in order: a sliding window of the last
``window_records`` outcomes (ratio checked once ``min_records`` are in it) and a
run of consecutive dead letters. Duplicates and retries are not dead letters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import islice, repeat

from pipeline.errors import BudgetExceeded
from pipeline.settings import DlqBudget


class Budget:
    def __init__(self, stage: str, limits: DlqBudget) -> None:
        self.stage = stage
        self.limits = limits
        #: the last window_records outcomes (the oldest falls off as one is added)
        self._window: deque[bool] = deque(maxlen=limits.window_records)
        self._dead_in_window = 0
        self.consecutive = 0
        self.tripped: str | None = None

    @property
    def ratio(self) -> float:
        return self._dead_in_window / len(self._window) if self._window else 0.0

    def check_clean(self, count: int) -> None:
        """Account ``count`` records none of which was dead-lettered: what
        :meth:`check` does with ``[False] * count``, without a step per record."""
        if self.tripped is not None:
            raise BudgetExceeded(self.tripped)
        limits = self.limits
        if not limits.enabled or count <= 0:
            return
        window = self._window
        before = len(window)
        self.consecutive = 0
        if before < limits.min_records <= before + count and self._dead_in_window:
            # the ratio is highest where the window first holds min_records: until it
            # is full nothing leaves it, and every clean record lowers the ratio
            ratio = self._dead_in_window / limits.min_records
            if limits.min_records <= limits.window_records and ratio > limits.max_ratio:
                self.tripped = (
                    f"stage {self.stage}: {self._dead_in_window} of the last "
                    f"{limits.min_records} records dead-lettered ({ratio:.0%} > "
                    f"dlq_budget.max_ratio={limits.max_ratio:.0%})"
                )
                raise BudgetExceeded(self.tripped)
        overflow = before + count - limits.window_records
        if overflow > 0 and self._dead_in_window:
            self._dead_in_window -= sum(islice(window, 0, min(overflow, before)))
        window.extend(repeat(False, count))  # the deque drops what falls off

    def check(self, outcomes: Iterable[bool]) -> None:
        """Account a batch's outcomes (True = dead-lettered), in input order.

        Raises BudgetExceeded at the first record that breaks a limit; the budget
        then stays tripped. The caller must not deliver that batch.
        """
        if self.tripped is not None:
            raise BudgetExceeded(self.tripped)
        limits = self.limits
        if not limits.enabled:
            return
        window = self._window
        full = limits.window_records
        for dead in outcomes:
            if len(window) == full:
                self._dead_in_window -= window[0]  # falls off as this one is added
            window.append(dead)
            self._dead_in_window += dead
            self.consecutive = self.consecutive + 1 if dead else 0
            if self.consecutive >= limits.max_consecutive:
                self.tripped = (
                    f"stage {self.stage}: {self.consecutive} consecutive dead letters "
                    f"(dlq_budget.max_consecutive={limits.max_consecutive})"
                )
            elif len(
                window
            ) >= limits.min_records and self._dead_in_window > limits.max_ratio * len(window):
                self.tripped = (
                    f"stage {self.stage}: {self._dead_in_window} of the last {len(window)} "
                    f"records dead-lettered ({self.ratio:.0%} > "
                    f"dlq_budget.max_ratio={limits.max_ratio:.0%})"
                )
            if self.tripped is not None:
                raise BudgetExceeded(self.tripped)
