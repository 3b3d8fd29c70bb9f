"""Cost accounting as pure functions, checked against hand-computed numbers."""

from __future__ import annotations

import pytest

from rlhfless.api.spec import BudgetSpec, CostSpec, GpuPrice
from rlhfless.cost import (
    USES,
    CostDefaults,
    Ledger,
    check_budget,
    cost_metrics,
    cost_status,
    dollars,
    merge_prices,
    planned_cost,
    rollout_tail,
    serverful_stage,
    split_stage,
    stage_prices,
    tail_start,
    with_defaults,
)
from rlhfless.cost.split import peak_in_flight
from rlhfless.cost.tail import estimated_finish_times
from rlhfless.scheduling.cost import Lifetime, cost_breakdown

# -- the split -----------------------------------------------------------------------------


def test_split_of_two_instances_sharing_requests() -> None:
    """Window [0, 10), 2 GPUs per instance. A: 0..10 (cold 2 s); B: 1..8 (cold 1 s), both
    ready at 2. Requests in flight: r1 0..6 (waits for A's cold start), r2 3..5.

    cold: A 2 s + B 1 s, × 2 GPUs = 6. From 2 both are engaged (r1 is in flight):
    [2,3) 1 of 2 serving: busy 2, idle 2; [3,5) both: busy 8; [5,6) one: busy 2, idle 2;
    [6,8) none: idle 8; [8,10) A alone: idle 4. busy 12, keep-alive idle 16, total 34."""
    lives = [Lifetime(0, None, 2, 2.0), Lifetime(1, 8, 2, 1.0)]
    split = split_stage(lives, [(0, 6), (3, 5)], 0, 10)
    assert split.cold_start == pytest.approx(6)
    assert split.busy == pytest.approx(12)
    assert split.prewarm_wait == pytest.approx(0)
    assert split.keep_alive_idle == pytest.approx(16)
    # The four buckets add up to exactly what is billed.
    assert split.total == pytest.approx(cost_breakdown(lives, 0, 10).gpu_seconds) == 34


def test_prewarm_wait_is_idle_time_before_the_first_request() -> None:
    """C (1 GPU) starts at 0, ready at 1, first request 4..6, ends at 9: cold 1, prewarm
    wait 3, busy 2, keep-alive 3. D was alive before the window (engaged already): its idle
    is keep-alive. E starts at 7 and never serves in the window: ready 8..10 is prewarm."""
    c = split_stage([Lifetime(0, 9, 1, 1.0)], [(4, 6)], 0, 10)
    assert (c.cold_start, c.prewarm_wait, c.busy, c.keep_alive_idle) == pytest.approx(
        (1, 3, 2, 3))
    d = split_stage([Lifetime(-5, 3, 1, 1.0)], [], 0, 10)
    assert (d.cold_start, d.prewarm_wait, d.keep_alive_idle) == pytest.approx((0, 0, 3))
    e = split_stage([Lifetime(7, None, 1, 1.0)], [], 0, 10)
    assert (e.cold_start, e.prewarm_wait, e.keep_alive_idle) == pytest.approx((1, 2, 0))


def test_split_clips_to_the_window_and_handles_empty_stages() -> None:
    # Alive 5..20 with cold 4 s: inside [10, 15) it is ready and idle (engaged before).
    s = split_stage([Lifetime(5, 20, 1, 4.0)], [(6, 9)], 10, 15)
    assert s.as_dict() == pytest.approx({"busy": 0, "cold_start": 0, "prewarm_wait": 0,
                                         "keep_alive_idle": 5})
    assert split_stage([], [(0, 1)], 0, 10).total == 0
    assert tuple(s.as_dict()) == USES


def test_serverful_holds_the_peak_for_the_whole_step() -> None:
    assert peak_in_flight([(0, 6), (3, 5), (6, 7)]) == 2  # back-to-back is not overlap
    sf = serverful_stage([(0, 6), (3, 5)], 2, 0, 10)
    assert (sf.gpus, sf.gpu_seconds, sf.busy, sf.idle) == pytest.approx((4, 40, 16, 24))
    assert serverful_stage([], 1, 0, 10).gpu_seconds == 0


# -- the tail ------------------------------------------------------------------------------


def test_tail_starts_when_fewer_than_half_still_run() -> None:
    # 4 samples: at 3 three are done and one runs (< 2); just before, two still ran.
    assert tail_start([10, 1, 3, 2]) == 3
    # 5 samples: fewer than 2.5 run once three are done.
    assert tail_start([1, 2, 3, 4, 10]) == 3
    assert tail_start([7]) == 7
    with pytest.raises(ValueError):
        tail_start([])


def test_rollout_tail_share_and_its_gpu_seconds() -> None:
    """Rollout [0, 10); X alive 0..10, Y alive 0..4 (1 GPU each): 14 GPU-s. Tail from 3:
    7 s (70%), X 7 + Y 1 = 8 GPU-s (8/14)."""
    lives = [Lifetime(0, 10, 1), Lifetime(0, 4, 1)]
    tail = rollout_tail([1, 2, 3, 10], 0, 10, lives)
    assert tail is not None
    assert (tail.start, tail.seconds, tail.share) == pytest.approx((3, 7, 0.7))
    assert (tail.gpu_seconds, tail.gpu_share) == pytest.approx((8, 8 / 14))
    # Another machine's clock a little off: finish times are clamped into the rollout.
    assert rollout_tail([-5, -4, -3, 11], 0, 10, lives).start == 0  # type: ignore[union-attr]
    assert rollout_tail([], 0, 10, lives) is None


def test_finish_times_estimated_from_lengths() -> None:
    assert estimated_finish_times([2, 8, 4], 10, 18) == pytest.approx([12, 18, 14])
    assert estimated_finish_times([0, 0], 0, 5) == [5, 5]


# -- prices --------------------------------------------------------------------------------


def test_prices_resolve_most_specific_first() -> None:
    cost = CostSpec.model_validate({
        "gpuType": "a100-80gb",  # case-insensitive
        "stageGpuTypes": {"learner": "B200", "reward": "L4"},
        "prices": {"L4": {"spot": 0.1}},
    }, by_alias=True)
    cluster = CostDefaults(gpu_type="H100", pricing="spot",
                           prices={"B200": GpuPrice(on_demand=9.0, spot=4.0)})
    prices = stage_prices(cost, ["actor", "reward", "learner"], cluster)
    assert prices.pricing == "spot"
    assert prices.gpu_type == {"actor": "a100-80gb", "reward": "L4", "learner": "B200"}
    assert prices.per_gpu_hour == {"actor": 1.60, "reward": 0.1, "learner": 4.0}
    on_demand = stage_prices(cost.model_copy(update={"pricing": "onDemand"}), ["reward"])
    assert on_demand.of("reward") == 0.80  # the job overrode only L4's spot price


def test_a_missing_price_is_a_warning_not_an_error() -> None:
    prices = stage_prices(CostSpec(gpu_type="MI300X"), ["actor", "reward"])
    assert prices.of("actor") is None
    [warning] = prices.warnings(["actor"])
    assert "'MI300X'" in warning and "GPU-seconds only" in warning and "actor" in warning
    # Dollars for priced stages only, and no total while a stage that used GPUs lacks one.
    mixed = stage_prices(CostSpec(stage_gpu_types={"reward": "L4"}, gpu_type="MI300X"),
                         ["actor", "reward"])
    assert dollars({"actor": 3600.0, "reward": 1800.0}, mixed) == {"reward": 0.4}
    # A stage without GPU-seconds does not need a price for the total to be complete.
    assert dollars({"actor": 0.0, "reward": 1800.0}, mixed) == {"reward": 0.4, "": 0.4}
    assert dollars({"actor": 1.0}, None) == {}


def test_merge_and_cluster_defaults() -> None:
    merged = merge_prices({"h100": GpuPrice(on_demand=1.0, spot=0.5)},
                          {"H100": GpuPrice(spot=0.2)})
    assert merged == {"H100": GpuPrice(on_demand=1.0, spot=0.2)}
    cluster = CostDefaults(gpu_type="L40S", pricing="spot",
                           prices={"L40S": GpuPrice(on_demand=2.0, spot=1.0)})
    filled = with_defaults(CostSpec(prices={"L40S": GpuPrice(spot=0.9)}), cluster)
    assert (filled.gpu_type, filled.pricing) == ("L40S", "spot")
    assert stage_prices(filled, ["actor"]).of("actor") == 0.9  # the job's own price wins
    own = with_defaults(CostSpec(gpu_type="L4", pricing="onDemand"), cluster)
    assert (own.gpu_type, own.pricing) == ("L4", "onDemand")


# -- a step's row --------------------------------------------------------------------------


def test_cost_metrics_row() -> None:
    """Window [0, 10). actor: 1 GPU alive 0..10 (cold 1), request 1..9; learner: 2 GPUs
    alive 6..10 (cold 2), request 8..10 (ready at 8). Prices $3.6/GPU-hour = $0.001/GPU-s."""
    lives = {"actor": [Lifetime(0, None, 1, 1.0)], "learner": [Lifetime(6, None, 2, 2.0)]}
    requests = {"actor": [(1, 9)], "learner": [(8, 10)]}
    prices = stage_prices(CostSpec(gpu_type="X", prices={"X": GpuPrice(on_demand=3.6)}),
                          ["actor", "learner"])
    samples = [(2.0, 3), (4.0, 5), (5.0, 6), (None, 16)]  # the last estimated: 9.0
    row = cost_metrics(lives, requests, 0, 10, prices, rollout_stages=["actor"],
                       samples=samples)
    assert row["cost/split/busy/actor"] == pytest.approx(8)
    assert row["cost/split/cold_start/actor"] == pytest.approx(1)
    assert row["cost/split/keep_alive_idle/actor"] == pytest.approx(1)
    assert row["cost/split/cold_start/learner"] == pytest.approx(4)
    assert row["cost/split/busy/learner"] == pytest.approx(4)
    assert row["cost/split/busy"] == pytest.approx(12)
    assert row["cost/dollars/actor"] == pytest.approx(0.010)
    assert row["cost/dollars/learner"] == pytest.approx(0.008)
    assert row["cost/dollars"] == pytest.approx(0.018)
    # Serverful: 1 + 2 GPUs for all 10 s = 30 GPU-s; busy 8 + 2×2 = 12.
    assert row["cost/serverful/gpu_seconds"] == pytest.approx(30)
    assert row["cost/serverful/gpu_seconds/learner"] == pytest.approx(20)
    assert (row["cost/serverful/busy"], row["cost/serverful/idle"]) == pytest.approx((12, 18))
    assert row["cost/saving/gpu_seconds"] == pytest.approx(12)
    assert row["cost/saving/ratio"] == pytest.approx(0.4)
    assert row["cost/serverful/dollars"] == pytest.approx(0.030)
    assert row["cost/saving/dollars"] == pytest.approx(0.012)
    # Tail: rollout 1..9; finish at 2, 4, 5, 9 (16 of 16 tokens) -> starts at 5: 4 s of 8.
    assert row["cost/tail/seconds"] == pytest.approx(4)
    assert row["cost/tail/share"] == pytest.approx(0.5)
    assert row["cost/tail/gpu_seconds"] == pytest.approx(4)
    assert row["cost/tail/estimated"] == pytest.approx(0.25)


def test_cost_metrics_without_prices_keep_gpu_seconds() -> None:
    row = cost_metrics({"actor": [Lifetime(0, 10, 1)]}, {"actor": [(0, 10)]}, 0, 10,
                       stage_prices(CostSpec(gpu_type="unknown-gpu"), ["actor"]))
    assert row["cost/split/busy/actor"] == pytest.approx(10)
    assert not [k for k in row if "dollars" in k]
    assert "cost/tail/seconds" not in row  # no samples, no tail


# -- budgets -------------------------------------------------------------------------------


def _row(gpu_s: float, usd: float | None = None) -> dict[str, float]:
    row = {"cost/gpu_seconds": gpu_s, "cost/gpu_seconds/actor": gpu_s,
           "cost/serverful/gpu_seconds": 2 * gpu_s}
    if usd is not None:
        row.update({"cost/dollars": usd, "cost/dollars/actor": usd,
                    "cost/serverful/dollars": 2 * usd})
    return row


def test_ledger_predicts_the_largest_recent_step() -> None:
    ledger = Ledger.of([_row(500, 5), _row(100, 1), _row(300, 3), _row(200, 2)])
    assert (ledger.steps, ledger.gpu_seconds, ledger.dollars) == (4, 1100, 11)
    assert ledger.next_step() == (300, 3)  # 500 is older than the last three steps
    assert Ledger().next_step() == (0.0, 0.0)
    assert Ledger.of([_row(10, 1), _row(10)]).dollars is None  # one step unpriced


def test_budget_stops_before_a_step_that_would_cross_it() -> None:
    ledger = Ledger.of([_row(100, 1), _row(300, 3), _row(200, 2)])  # 600 s = 1/6 h, $6
    # 600 + 300 = 900 GPU-s = 0.25 h: exactly the limit still runs.
    assert not check_budget(ledger, BudgetSpec(max_gpu_hours=0.25)).exceeded
    over = check_budget(ledger, BudgetSpec(max_gpu_hours=0.24))
    assert over.exceeded and over.used == pytest.approx((600 / 3600) / 0.24)
    assert "spec.budget.maxGpuHours" in over.message and "Raise" in over.message
    assert check_budget(ledger, BudgetSpec(max_dollars=8.5)).exceeded  # 6 + 3 > 8.5
    assert not check_budget(ledger, BudgetSpec(max_dollars=9)).exceeded
    assert check_budget(ledger, BudgetSpec()) == check_budget(Ledger(), BudgetSpec())
    assert not check_budget(ledger, BudgetSpec()).exceeded
    # The first step runs (nothing to predict from) unless nothing is left.
    assert not check_budget(Ledger(), BudgetSpec(max_gpu_hours=1e-9)).exceeded


def test_the_plan_for_the_next_step_raises_the_forecast() -> None:
    # The plan said 50 GPU-s for the step that cost 100 and says 150 for the next: 300.
    assert planned_cost(150, 50, 100, 2.0) == pytest.approx((300, 6.0))
    assert planned_cost(150, 50, 100, None) == (pytest.approx(300), None)
    assert planned_cost(150, 0, 100, 2.0) is None  # nothing to scale by
    ledger = Ledger.of([_row(100, 1), _row(300, 3), _row(200, 2)])  # 600 GPU-s so far
    assert check_budget(ledger, BudgetSpec(max_gpu_hours=0.25)).exceeded is False
    ledger.planned = planned_cost(150, 50, 200, 2.0)  # the next step's prompts run longer
    assert ledger.next_step() == (pytest.approx(600), pytest.approx(6.0))
    over = check_budget(ledger, BudgetSpec(max_gpu_hours=0.25))  # 600 + 600 > 900
    assert over.exceeded and "the plan for the next" in over.message
    ledger.planned = planned_cost(10, 50, 200, 2.0)  # a smaller plan never lowers it
    assert ledger.next_step() == (300, 3)
    ledger.planned = (900.0, None)  # an unpriced estimate makes dollars unknown
    assert ledger.next_step() == (900, None)
    # What the operator judges is the same: the plan travels in the driver's report.
    assert Ledger.from_report(ledger.report()).next_step() == (900, None)


def test_a_dollar_budget_without_prices_is_a_warning() -> None:
    ledger = Ledger.of([_row(100)])
    check = check_budget(ledger, BudgetSpec(max_dollars=0.01, max_gpu_hours=1))
    assert not check.exceeded and "maxDollars cannot be checked" in check.warnings[0]
    assert check_budget(ledger, BudgetSpec(max_dollars=0.01,
                                           max_gpu_hours=0.05)).exceeded  # 200 s > 180 s


def test_cost_status_totals() -> None:
    status = cost_status(Ledger.of([_row(100, 1), _row(300, 3)]))
    assert status == {"gpuSeconds": 400, "dollars": 4, "stages": {
        "actor": {"gpuSeconds": 400, "dollars": 4}}, "serverfulGpuSeconds": 800,
        "serverfulDollars": 8, "nextStepGpuSeconds": 300, "nextStepDollars": 3}
    assert cost_status(Ledger()) == {"gpuSeconds": 0, "stages": {}, "serverfulGpuSeconds": 0}
