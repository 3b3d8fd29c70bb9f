"""GPU prices: a default table per accelerator and each stage's price for one job.

Prices are $ per GPU-hour. The defaults are typical on-demand and spot list prices of the
large clouds (per GPU, the instance's CPU and memory share included), rounded; they are
placeholders for your own rates: override them in the operator's Helm values
(`cost.prices`) or in a job (`spec.cost.prices`). The README cites where they come from.

The operator's table travels as environment variables (`COST_ENV`): its Deployment has them
from the Helm values, and it hands them on to each job's driver pod, which prices the job
with them (`priced_job`).

Resolution, most specific first: `spec.cost.prices` > the operator's table > the defaults;
the GPU type of a stage is `spec.cost.stageGpuTypes[stage]` > `spec.cost.gpuType` > the
operator's `cost.gpuType` > H100. A GPU type with no price leaves that stage without
dollars (a warning, never an error): its GPU-seconds are still reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import TypeAdapter, ValidationError

from rlhfless.api.spec import GPU_TYPE_PATTERN, CostSpec, GpuPrice, GpuType, JobSpec, RLHFJob

ON_DEMAND, SPOT = "onDemand", "spot"
DEFAULT_GPU_TYPE = "H100"
DEFAULT_PRICING = ON_DEMAND

# $ per GPU-hour (on demand, spot): see README "Cost and budgets" for the sources.
DEFAULT_PRICES: dict[str, GpuPrice] = {
    "H100": GpuPrice(on_demand=6.88, spot=3.00),
    "H200": GpuPrice(on_demand=7.91, spot=3.50),
    "A100-80GB": GpuPrice(on_demand=3.43, spot=1.60),
    "L40S": GpuPrice(on_demand=1.86, spot=0.75),
    "L4": GpuPrice(on_demand=0.80, spot=0.35),
    "A10G": GpuPrice(on_demand=1.01, spot=0.45),
}


@dataclass(frozen=True)
class CostDefaults:
    """What a cluster (the operator's Helm values) or `rlhfless run` assumes for a job that
    does not say: the GPU type, which price applies, and the price table."""

    gpu_type: str = DEFAULT_GPU_TYPE
    pricing: str = DEFAULT_PRICING
    prices: Mapping[str, GpuPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))


def merge_prices(*tables: Mapping[str, GpuPrice]) -> dict[str, GpuPrice]:
    """Later tables win, field by field (a job may override only the spot price of a type);
    GPU types are matched case-insensitively and keyed by their upper-case spelling."""
    out: dict[str, GpuPrice] = {}
    for table in tables:
        for gpu_type, price in table.items():
            key = gpu_type.upper()
            old = out.get(key, GpuPrice())
            out[key] = GpuPrice(
                on_demand=price.on_demand if price.on_demand is not None else old.on_demand,
                spot=price.spot if price.spot is not None else old.spot,
            )
    return out


@dataclass(frozen=True)
class StagePrices:
    """$ per GPU-hour of each stage (None: no price for its GPU type), and why not."""

    gpu_type: dict[str, str]
    per_gpu_hour: dict[str, float | None]
    pricing: str

    def of(self, stage: str) -> float | None:
        return self.per_gpu_hour.get(stage)

    def warnings(self, stages: Iterable[str] | None = None) -> list[str]:
        """One line per GPU type without a price, for the stages given (default all)."""
        names = list(self.per_gpu_hour) if stages is None else list(stages)
        missing: dict[str, list[str]] = {}
        for stage in names:
            if self.per_gpu_hour.get(stage) is None:
                missing.setdefault(self.gpu_type[stage], []).append(stage)
        return [f"no {self.pricing} price for GPU type {gpu!r} (stages: {', '.join(s)}): "
                f"their cost is reported in GPU-seconds only; add spec.cost.prices.{gpu}"
                for gpu, s in missing.items()]


def stage_prices(cost: CostSpec, stages: Iterable[str],
                 defaults: CostDefaults | None = None) -> StagePrices:
    """Each stage's GPU type and price for a job's `spec.cost` over the defaults."""
    defaults = defaults or CostDefaults()
    table = merge_prices(DEFAULT_PRICES, defaults.prices, cost.prices)
    pricing = cost.pricing or defaults.pricing
    gpu_type: dict[str, str] = {}
    per_hour: dict[str, float | None] = {}
    for stage in stages:
        gpu = cost.stage_gpu_types.get(stage) or cost.gpu_type or defaults.gpu_type
        price = table.get(gpu.upper())
        gpu_type[stage] = gpu
        per_hour[stage] = None if price is None else (
            price.spot if pricing == SPOT else price.on_demand)
    return StagePrices(gpu_type, per_hour, pricing)


def job_prices(spec: JobSpec, defaults: CostDefaults | None = None) -> StagePrices:
    """The prices of the stages a job deploys."""
    return stage_prices(spec.cost, spec.stages.deployed, defaults)


def job_cost_warnings(spec: JobSpec, defaults: CostDefaults | None = None) -> list[str]:
    """GPU types without a price among the stages that use GPUs, and a dollar budget that
    therefore cannot be checked."""
    gpu_stages = [s.name for s in spec.stages if s.deployed and s.gpus > 0]
    warnings = job_prices(spec, defaults).warnings(gpu_stages)
    if warnings and spec.budget.max_dollars is not None:
        warnings.append("spec.budget.maxDollars cannot be checked without those prices; "
                        "only spec.budget.maxGpuHours applies")
    return warnings


def with_defaults(cost: CostSpec, defaults: CostDefaults) -> CostSpec:
    """`spec.cost` with a cluster's defaults filled in (the job's own settings win), so a
    driver given the result needs nothing else to price the job."""
    return cost.model_copy(update={
        "gpu_type": cost.gpu_type or defaults.gpu_type,
        "pricing": cost.pricing or defaults.pricing,
        "prices": merge_prices(defaults.prices, cost.prices),
    })


# The environment that carries a cluster's CostDefaults (operator Deployment → driver pods).
ENV_GPU_TYPE = "RLHFLESS_GPU_TYPE"
ENV_PRICING = "RLHFLESS_PRICING"
ENV_PRICES = "RLHFLESS_GPU_PRICES"
COST_ENV = (ENV_GPU_TYPE, ENV_PRICING, ENV_PRICES)
_PRICE_TABLE = TypeAdapter(dict[GpuType, GpuPrice])


def cost_defaults_from_env(env: Mapping[str, str]) -> CostDefaults:
    """The cluster's GPU type, pricing and price table (Helm values `cost.*`); a bad value is
    an error naming the variable, so the operator refuses to start rather than misprice."""
    gpu_type = env.get(ENV_GPU_TYPE) or DEFAULT_GPU_TYPE
    if not re.match(GPU_TYPE_PATTERN, gpu_type):
        raise ValueError(f"{ENV_GPU_TYPE}: {gpu_type!r} is not a GPU type name")
    pricing = env.get(ENV_PRICING) or ON_DEMAND
    if pricing not in (ON_DEMAND, SPOT):
        raise ValueError(f"{ENV_PRICING}: must be {ON_DEMAND!r} or {SPOT!r}, got {pricing!r}")
    prices = dict(DEFAULT_PRICES)
    raw = env.get(ENV_PRICES)
    if raw:
        try:
            prices = _PRICE_TABLE.validate_python(json.loads(raw), strict=True)
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                              for e in exc.errors())
            raise ValueError(f"{ENV_PRICES} (Helm values cost.prices): {where}") from None
        except ValueError as exc:
            raise ValueError(f"{ENV_PRICES}: not JSON: {exc}") from None
    return CostDefaults(gpu_type=gpu_type, pricing=pricing, prices=prices)


def cost_env(defaults: CostDefaults) -> list[dict[str, str]]:
    """`defaults` as a pod's environment (what `cost_defaults_from_env` reads back)."""
    table = {gpu: price.model_dump(by_alias=True, exclude_none=True)
             for gpu, price in sorted(defaults.prices.items())}
    return [{"name": ENV_GPU_TYPE, "value": defaults.gpu_type},
            {"name": ENV_PRICING, "value": defaults.pricing},
            {"name": ENV_PRICES, "value": json.dumps(table, separators=(",", ":"))}]


def priced_job(job: RLHFJob, defaults: CostDefaults) -> RLHFJob:
    """The job with the cluster's GPU type and prices filled into `spec.cost`."""
    spec = job.spec.model_copy(update={"cost": with_defaults(job.spec.cost, defaults)})
    return job.model_copy(update={"spec": spec})
