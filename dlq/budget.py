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

from pipeline.errors import BudgetExceeded
from pipeline.settings import DlqBudget


class Budget:
    def __init__(self, stage: str, limits: DlqBudget) -> None:
        self.stage = stage
        self.limits = limits
        self._window: deque[bool] = deque()
        self._dead_in_window = 0
        self.consecutive = 0
        self.tripped: str | None = None

    @property
    def ratio(self) -> float:
        return self._dead_in_window / len(self._window) if self._window else 0.0

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
        for dead in outcomes:
            window.append(dead)
            self._dead_in_window += dead
            if len(window) > limits.window_records:
                self._dead_in_window -= window.popleft()
            self.consecutive = self.consecutive + 1 if dead else 0
            if self.consecutive >= limits.max_consecutive:
                self.tripped = (
                    f"stage {self.stage}: {self.consecutive} consecutive dead letters "
                    f"(dlq_budget.max_consecutive={limits.max_consecutive})"
                )
            elif len(window) >= limits.min_records and self.ratio > limits.max_ratio:
                self.tripped = (
                    f"stage {self.stage}: {self._dead_in_window} of the last {len(window)} "
                    f"records dead-lettered ({self.ratio:.0%} > "
                    f"dlq_budget.max_ratio={limits.max_ratio:.0%})"
                )
            if self.tripped is not None:
                raise BudgetExceeded(self.tripped)
