"""What a job costs and where it goes: prices, the GPU-second split, the rollout's tail, the
serverful comparison, budgets. Pure functions of numbers; the driver and the operator call
them (`rlhfless.scheduling.cost` keeps the planner's GPU-second model)."""

from rlhfless.cost.budget import BudgetCheck, Ledger, check_budget, cost_status, planned_cost
from rlhfless.cost.prices import (
    DEFAULT_PRICES,
    CostDefaults,
    StagePrices,
    job_cost_warnings,
    job_prices,
    merge_prices,
    stage_prices,
    with_defaults,
)
from rlhfless.cost.row import cost_metrics, dollars
from rlhfless.cost.split import USES, Split, serverful_stage, split_stage
from rlhfless.cost.tail import Tail, rollout_tail, tail_start

__all__ = [
    "DEFAULT_PRICES", "USES", "BudgetCheck", "CostDefaults", "Ledger", "Split", "StagePrices",
    "Tail", "check_budget", "cost_metrics", "cost_status", "dollars", "job_cost_warnings",
    "job_prices", "merge_prices", "planned_cost", "rollout_tail", "serverful_stage", "split_stage",
    "stage_prices", "tail_start", "with_defaults",
]
