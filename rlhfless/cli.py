"""`rlhfless` command line: run, validate, report, manifests, export, crd, operator, driver,
serve, simulate.

Exit codes: 0 done, 1 the run failed, 2 invalid input (job file, option, the checkpoint to
resume, a metrics port in use), 3 stopped by spec.budget (raise it, then --resume), 130
interrupted (Ctrl-C; the last completed step is checkpointed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rlhfless.api.quantity import format_bytes
from rlhfless.api.spec import RLHFJob, SpecError, dump_job, job_namespace, load_job, parse_job

if TYPE_CHECKING:
    from rlhfless.driver.records import StepRecord
    from rlhfless.jobmetrics import JobReporter, MetricsServer

if TYPE_CHECKING:
    from rlhfless.cost import BudgetCheck

EXIT_FAILED, EXIT_INVALID, EXIT_BUDGET, EXIT_INTERRUPTED = 1, 2, 3, 130
# Function instances listen on loopback only; the job's metrics sit beside them.
METRICS_HOST = "127.0.0.1"


def _run_errors() -> tuple[type[Exception], ...]:
    """Failures a user can act on: reported as one message, not a traceback."""
    from rlhfless.driver.rollout import LostSamplesError
    from rlhfless.driver.tracking import TrackingError
    from rlhfless.model.loading import ModelLoadError
    from rlhfless.rewards.datasets import DatasetError
    from rlhfless.runtime.base import InvocationError
    from rlhfless.store import CheckpointError, WeightStoreError

    return (CheckpointError, ModelLoadError, DatasetError, LostSamplesError, InvocationError,
            WeightStoreError, TrackingError)


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Serverless synchronous RLHF (GRPO/PPO) for language models.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # paths and commands stay copyable


def _invalid(exc: SpecError) -> typer.Exit:
    err_console.print(f"[bold red]{escape(exc.source)}: invalid job[/]")
    for line in exc.errors:
        err_console.print(f"  • {escape(line)}")
    return typer.Exit(EXIT_INVALID)


def _load_or_exit(path: Path) -> RLHFJob:
    try:
        return load_job(path)
    except SpecError as exc:
        raise _invalid(exc) from None


def _with_steps(job: RLHFJob, steps: int) -> RLHFJob:
    """The job with `--steps` in place of spec.steps, validated as if the file said so."""
    document = dump_job(job)
    document["spec"]["steps"] = steps
    try:
        return parse_job(document, "--steps")
    except SpecError as exc:
        raise _invalid(exc) from None


def _check_resumable(run_dir: Path) -> None:
    """Refuse a malformed checkpoint before anything in the run directory is touched."""
    from rlhfless.store import CheckpointError, load_checkpoint

    try:
        load_checkpoint(run_dir)
    except CheckpointError as exc:
        err_console.print(f"[bold red]cannot resume:[/] {escape(str(exc))}")
        err_console.print("Nothing was changed. Restore the file, or start again with "
                          "--overwrite (this deletes the run directory).")
        raise typer.Exit(EXIT_INVALID) from None


GpuMemoryOption = Annotated[str | None, typer.Option(
    "--gpu-memory", help="Memory of one GPU (e.g. 48Gi) for the memory plan; default: "
    "RLHFLESS_GPU_MEMORY, the local GPUs (run), else 80Gi.")]


def _fit_or_exit(job: RLHFJob, source: Path, gpu_memory: str | None,
                 local_gpus: bool = False, show: bool = False) -> None:
    """Tensor parallelism and the memory plan; exit 2 naming the fields to change."""
    from rlhfless.model.fit import check_job
    from rlhfless.model.memory import gpu_memory_bytes

    try:
        memory = gpu_memory_bytes(gpu_memory)
    except ValueError as exc:
        err_console.print(f"[bold red]--gpu-memory:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if local_gpus and gpu_memory is None:
        from rlhfless.runtime.gpu_pool import local_gpu_memory

        memory = local_gpu_memory() or memory
    report = check_job(job.spec, open_files=True, gpu_memory=memory)
    if report.invalid:
        raise _invalid(SpecError(report.invalid, str(source)))
    if report.errors:
        err_console.print(f"[bold red]{escape(str(source))}: does not fit its resources[/]")
        for line in report.errors:
            err_console.print(f"  • {escape(line)}")
        raise typer.Exit(2)
    for line in ([report.note] if report.note else []) + report.warnings:
        console.print(f"[yellow]{escape(line)}[/]")
    if show and report.estimates:
        console.print("memory plan, per instance and device:")
        for est in report.estimates:
            console.print(f"  {est.stage}: ~{format_bytes(est.total)} of "
                          f"{format_bytes(est.capacity)} ({est.device})")
        for source in dict.fromkeys(e.capacity_source for e in report.estimates):
            console.print(f"  [dim]capacity: {escape(source)}[/]")


def _budget_stop(job_file: Path, message: str, completed: int, steps: int) -> typer.Exit:
    err_console.print(f"[bold yellow]Budget reached:[/] {escape(message)}")
    err_console.print(f"Stopped after step {completed} of {steps} (checkpointed). Raise the "
                      f"budget in {escape(str(job_file))}, then: rlhfless run "
                      f"{escape(str(job_file))} --resume")
    return typer.Exit(EXIT_BUDGET)


def _check_budget_left(run_dir: Path, job: RLHFJob, job_file: Path) -> None:
    """Refuse to start the functions for a resumed run whose budget is already used up."""
    from rlhfless.cost import Ledger, check_budget
    from rlhfless.driver.records import MetricsLog
    from rlhfless.store import load_checkpoint

    checkpoint = load_checkpoint(run_dir)
    done = checkpoint.step if checkpoint is not None else 0
    log = MetricsLog(run_dir / "metrics.jsonl")
    try:
        rows = log.read(upto=done)
    except (ValueError, KeyError, TypeError) as exc:
        err_console.print(f"[bold red]cannot resume:[/] {escape(str(log.path))} is not a "
                          f"metrics log ({escape(str(exc))}). Nothing was changed.")
        raise typer.Exit(EXIT_INVALID) from None
    budget = check_budget(Ledger.of(rows), job.spec.budget)
    if budget.exceeded and done < job.spec.steps:
        raise _budget_stop(job_file, budget.message, done, job.spec.steps)


@app.command()
def validate(
    job_file: Annotated[Path, typer.Argument(help="RLHFJob YAML file.")],
    gpu_memory: GpuMemoryOption = None,
) -> None:
    """Check a job file: every spec error, its dataset (when it is here), tensor parallelism,
    and the memory plan."""
    from rlhfless.cost import job_cost_warnings

    job = _load_or_exit(job_file)
    _fit_or_exit(job, job_file, gpu_memory, show=True)
    dataset_note = _check_dataset_here(job)
    console.print(f"[green]{job_file}: valid[/] (job {job.metadata.name}, "
                  f"{job.spec.algorithm.name}, {job.spec.steps} steps{dataset_note})")
    for warning in job_cost_warnings(job.spec):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")


def _check_dataset_here(job: RLHFJob) -> str:
    """Read a file dataset that exists on this machine with the job's reward, so a missing
    column or an unusable ground truth shows now rather than at the first step."""
    from rlhfless.rewards.datasets import FILE_KINDS, DatasetError, load_dataset

    ds = job.spec.dataset
    if ds.kind not in FILE_KINDS:
        return ""
    if not Path(str(ds.path)).exists():
        return f"; dataset {ds.path} is not on this machine: it is checked when the job starts"
    try:
        items = load_dataset(ds, job.spec.reward)
    except DatasetError as exc:
        err_console.print(f"[bold red]dataset: {escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    return f"; dataset: {len(items)} prompts"


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="RLHFJob YAML file.")],
    run_dir: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory.")] = False,
    steps: Annotated[int | None, typer.Option(help="Override spec.steps.")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        min=0, max=65535,
        help="Serve the job's Prometheus metrics on 127.0.0.1:PORT (0: any free port) and "
             "write RUN_DIR/prometheus.yml for a local Prometheus.")] = None,
    gpu_memory: GpuMemoryOption = None,
    skip_fit_check: Annotated[bool, typer.Option(
        help="Start even if the memory plan says a stage does not fit.")] = False,
) -> None:
    """Run a job on the embedded local runtime (each stage a local function process).

    Exit codes: 0 done, 1 the run failed, 2 invalid input (a metrics port in use too),
    3 stopped by spec.budget,
    130 interrupted."""
    job = _load_or_exit(job_file)
    if steps is not None:
        job = _with_steps(job, steps)
    if job.spec.suspend:
        err_console.print(f"[red]{escape(str(job_file))}: spec.suspend is true[/]: a suspended "
                          "job does not run. Set it to false to run it.")
        raise typer.Exit(EXIT_INVALID)
    if not skip_fit_check:
        _fit_or_exit(job, job_file, gpu_memory, local_gpus=True)
    run_dir = run_dir or Path("runs") / job.metadata.name
    has_checkpoint = (run_dir / "checkpoint.json").exists()
    if has_checkpoint and not resume and not overwrite:
        err_console.print(f"[red]{run_dir} already holds a run.[/] Use --resume to continue "
                          "it or --overwrite to start again.")
        raise typer.Exit(EXIT_INVALID)
    if resume:
        _check_resumable(run_dir)
        _check_budget_left(run_dir, job, job_file)
    # Take the port before touching the run directory: a port in use changes nothing.
    reporter, server = (None, None) if metrics_port is None else _serve_job_metrics(
        job, metrics_port)
    if overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    if server is not None:
        _write_prometheus_config(run_dir, job, server.port)
    resume_hint = f"Resume with: rlhfless run {job_file} --resume"
    try:
        completed, interrupted, budget = asyncio.run(
            _run_local(job, run_dir, str(job_file), reporter))
    except KeyboardInterrupt:
        err_console.print(f"[yellow]Aborted; the last completed step is checkpointed. "
                          f"{resume_hint}[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except _run_errors() as exc:  # evaluated only when something went wrong
        from rlhfless.store import CheckpointError

        err_console.print(f"[bold red]run failed:[/] {escape(str(exc))}")
        if not isinstance(exc, CheckpointError):  # its message says how to go on
            err_console.print(f"Function logs: {run_dir / 'logs'}. Completed steps are "
                              f"checkpointed; continue with: rlhfless run {job_file} --resume")
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        if server is not None:
            server.close()
    _summarise(run_dir, completed, job)
    if budget.exceeded and completed < job.spec.steps:
        raise _budget_stop(job_file, budget.message, completed, job.spec.steps)
    if interrupted and completed < job.spec.steps:
        # A resumable stop is still a stop: scripts must not mistake it for a finished run.
        err_console.print(f"[yellow]Stopped after step {completed} of {job.spec.steps}. "
                          f"{resume_hint}[/]")
        raise typer.Exit(EXIT_INTERRUPTED)


def _serve_job_metrics(job: RLHFJob, port: int) -> tuple[JobReporter, MetricsServer]:
    """`--metrics-port`: the job's Prometheus series (the operator's, for this one job)."""
    from rlhfless.jobmetrics import JobMetrics, JobReporter, MetricsPortError

    metrics = JobMetrics()
    try:
        server = metrics.serve(port, addr=METRICS_HOST)
    except MetricsPortError as exc:
        err_console.print(f"[red]--metrics-port {port}:[/] {escape(str(exc.strerror))}. "
                          "Nothing was started. Pick a free port (0: any free port).")
        raise typer.Exit(EXIT_INVALID) from None
    reporter = JobReporter(metrics, job_namespace(job), job.metadata.name,
                           tuple(job.spec.stages.deployed))
    return reporter, server


def _write_prometheus_config(run_dir: Path, job: RLHFJob, port: int) -> None:
    """RUN_DIR/prometheus.yml: the job's metrics, every function instance (through the
    discovery file) and the chart's rules (from a source checkout)."""
    import yaml

    from rlhfless.runtime.discovery import (
        CHART_RULES,
        PROMETHEUS_CONFIG_FILE,
        TARGETS_FILE,
        prometheus_config,
    )

    run_dir = run_dir.resolve()
    config = prometheus_config(run_dir / TARGETS_FILE, f"{METRICS_HOST}:{port}",
                               [CHART_RULES] if CHART_RULES.exists() else [])
    path = run_dir / PROMETHEUS_CONFIG_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Prometheus for `rlhfless run` of {job.metadata.name}: "
                    f"prometheus --config.file={path}\n" + yaml.safe_dump(config, sort_keys=False))
    console.print(f"metrics: http://{METRICS_HOST}:{port}/metrics · Prometheus config: {path}")


async def _run_local(job: RLHFJob, run_dir: Path, job_file: str,
                     reporter: JobReporter | None = None) -> tuple[int, bool, BudgetCheck]:
    """(steps completed, whether Ctrl-C asked to stop, the budget when the driver stopped)."""
    from rlhfless.driver import Driver
    from rlhfless.runtime.local import LocalRuntime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err_console.print("[yellow]Stopping after the current step (Ctrl-C again to abort)…[/]")

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
    )
    async with LocalRuntime(job, run_dir / "store", run_dir) as runtime:
        driver = Driver(job, runtime, run_dir)
        # A corrupt latest version is found here, before any step: fall back, and say so.
        notice = await asyncio.to_thread(driver.prepare, job_file)
        if notice:
            err_console.print(f"[yellow]{escape(notice)}[/]")
        task = progress.add_task(job.metadata.name, total=job.spec.steps,
                                 completed=driver.completed_steps, info="starting functions…")

        def on_step(record: StepRecord) -> None:
            m = record.metrics
            usd = f" · ${m['cost/dollars']:.4f}" if "cost/dollars" in m else ""
            progress.update(task, completed=record.step, info=(
                f"reward {record.reward_mean:.3f} · step {m['timing_s/step']:.1f}s · "
                f"{m['cost/gpu_seconds']:.1f} GPU-s{usd}"))
            if reporter is not None:
                reporter.step(record, runtime.meter(), driver.budget.used)

        if reporter is not None:
            reporter.driver_started()
        try:
            with progress:
                completed = await driver.run(stop=stop, on_step=on_step)
        finally:
            if reporter is not None:
                reporter.driver_stopped()
    return completed, stop.is_set(), driver.budget


def _summarise(run_dir: Path, completed: int, job: RLHFJob) -> None:
    from rlhfless.driver.plots import write_plots
    from rlhfless.driver.records import MetricsLog

    rows = MetricsLog(run_dir / "metrics.jsonl").read()
    plots = write_plots(rows, run_dir)
    if not rows:
        console.print("No step completed.")
        return
    table = Table(title=f"{job.metadata.name}: {completed}/{job.spec.steps} steps")
    for column in ("step", "reward", "step s", "gen s", "GPU-s", "actors"):
        table.add_column(column, justify="right")
    for r in rows[-10:]:
        table.add_row(str(r["step"]), f"{r['reward/mean']:.3f}", f"{r['timing_s/step']:.2f}",
                      f"{r.get('timing_s/gen', 0):.2f}", f"{r['cost/gpu_seconds']:.1f}",
                      str(int(r.get("sched/actors", 0))))
    console.print(table)
    first, last = rows[0]["reward/mean"], rows[-1]["reward/mean"]
    console.print(f"reward {first:.3f} → {last:.3f}; metrics: {run_dir / 'metrics.jsonl'}")
    console.print(_cost_line(rows))
    for p in plots:
        console.print(f"plot: {p}")
    console.print(f"report: rlhfless report {run_dir}")


def _cost_line(rows: list[dict]) -> str:
    from rlhfless.cost import Ledger

    ledger = Ledger.of(rows)
    usd = "" if ledger.dollars is None else f" (${ledger.dollars:.4f})"
    line = f"cost: {ledger.gpu_seconds:.1f} GPU-s{usd}"
    if ledger.serverful_gpu_seconds > 0:
        sf_usd = ("" if ledger.serverful_dollars is None
                  else f" (${ledger.serverful_dollars:.4f})")
        line += (f"; serverful on the same timings: {ledger.serverful_gpu_seconds:.1f} "
                 f"GPU-s{sf_usd}")
    return line


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holds metrics.jsonl).")],
    out: Annotated[Path | None, typer.Option(
        help="Where to write the page (default: RUN_DIR/report.html).")] = None,
) -> None:
    """Write one self-contained HTML report of a run: reward, cost per stage, where the
    GPU-seconds went, the instance timeline, scheduling decisions, serverful comparison.

    Exit codes: 0 written, 2 nothing to report (no metrics in RUN_DIR)."""
    from rlhfless.report import ReportError, write_report

    try:
        path = write_report(run_dir, out)
    except ReportError as exc:
        err_console.print(f"[bold red]no report:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    console.print(f"report: {path}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holding store/), or a store.")],
    out: Annotated[Path, typer.Option(help="Directory to write the Hugging Face model to.")],
    version: Annotated[int | None, typer.Option(
        help="Weights version (default: the checkpointed one, else the newest).")] = None,
) -> None:
    """Write a trained version as a Hugging Face model directory (transformers, vLLM)."""
    from rlhfless.model.export import export_run
    from rlhfless.store import WeightStoreError

    try:
        written, chosen = export_run(run_dir, out, version)
    except WeightStoreError as exc:
        err_console.print(f"[bold red]export failed:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None  # a run dir or version that is not there
    console.print(f"[green]exported version {chosen}[/] of {run_dir} to {written}")


@app.command()
def crd() -> None:
    """Print the RLHFJob CustomResourceDefinition generated from the spec model."""
    from rlhfless.api.crd import crd_yaml

    typer.echo(crd_yaml(), nl=False)


PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


@app.command()
def manifests(
    job_file: Annotated[Path, typer.Argument(help="RLHFJob YAML file.")],
    namespace: Annotated[str | None, typer.Option(
        help="Namespace (default: the job's metadata.namespace, else 'default').")] = None,
    uid: Annotated[str, typer.Option(
        help="The RLHFJob's uid (the API server assigns it; owner references and the "
             "job's folder on the weights volume use it).")] = PLACEHOLDER_UID,
) -> None:
    """Print every object the operator would create for this job, as YAML (no cluster)."""
    import yaml

    from rlhfless.cost.prices import cost_defaults_from_env
    from rlhfless.knative.manifests import job_manifests
    from rlhfless.knative.pods import FunctionSettings

    job = _load_or_exit(job_file)
    ns = namespace or job_namespace(job)
    try:
        cost = cost_defaults_from_env(os.environ)
    except ValueError as exc:  # the operator's price settings, as the chart sets them
        err_console.print(f"[bold red]cost settings:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    objects = job_manifests(job, namespace=ns, uid=uid, settings=FunctionSettings.from_env(),
                            cost=cost)
    typer.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)


@app.command()
def operator(
    namespace: Annotated[str | None, typer.Option(help="Watch one namespace (default all).")]
    = None,
    liveness: Annotated[str | None, typer.Option(help="kopf liveness endpoint URL.")] = None,
    metrics_port: Annotated[int, typer.Option(
        min=0, max=65535, help="Prometheus port (0: no metrics).")] = 9090,
) -> None:
    """Run the Kubernetes operator (kopf) that reconciles RLHFJob resources.

    Exit codes: 2 when the metrics port cannot be listened on."""
    from rlhfless.jobmetrics import MetricsPortError
    from rlhfless.operator.main import run_operator

    try:
        run_operator(namespace=namespace, liveness=liveness, metrics_port=metrics_port)
    except MetricsPortError as exc:
        err_console.print(f"[red]--metrics-port {metrics_port}:[/] {escape(str(exc.strerror))}")
        raise typer.Exit(EXIT_INVALID) from None


@app.command()
def driver(
    namespace: Annotated[str, typer.Option(help="Namespace of the job and its functions.")],
    run_dir: Annotated[Path, typer.Option(help="Checkpoint and metrics directory.")]
    = Path("/data/run"),
    store: Annotated[Path, typer.Option(help="Weights store directory.")] = Path("/data/store"),
    job: Annotated[Path | None, typer.Option(
        help="Job file (default: the RLHFJOB_SPEC env var).")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="Also serve the job's Prometheus metrics on this port (the "
                               "operator exports them from the driver's progress anyway).")]
    = None,
) -> None:
    """Run one job's driver on the Knative runtime (what the operator's driver pod runs).

    Exit codes: 0 done, stopped (suspend, spec change) or at spec.budget; 1 the run failed;
    2 invalid input (the job, the token, the cost settings, a metrics port in use)."""
    import logging

    from rlhfless.driver_pod import job_from, main
    from rlhfless.jobmetrics import MetricsPortError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        loaded = job_from(job)
    except SpecError as exc:
        raise _invalid(exc) from None
    try:
        code = asyncio.run(main(loaded, namespace=namespace, run_dir=run_dir, store_dir=store,
                                metrics_port=metrics_port))
    except MetricsPortError as exc:
        err_console.print(f"[red]--metrics-port {metrics_port}:[/] {escape(str(exc.strerror))}")
        raise typer.Exit(EXIT_INVALID) from None
    raise typer.Exit(code)


@app.command()
def serve(
    stage: Annotated[str, typer.Option(help="actor|reward|learner")],
    port: Annotated[int, typer.Option()] = 8080,
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    store: Annotated[Path, typer.Option(help="Weights store directory.")] = Path("/weights"),
    job: Annotated[Path | None, typer.Option(
        help="Job file (default: the RLHFJOB_SPEC env var).")] = None,
) -> None:
    """Serve one stage function over HTTP (what each Knative revision runs)."""
    from rlhfless.functions.serve import main as serve_main

    args = ["--stage", stage, "--port", str(port), "--host", host, "--store", str(store)]
    if job is not None:
        args += ["--job", str(job)]
    serve_main(args)


@app.command()
def simulate(
    experiment: Annotated[str, typer.Option(
        help="headline|testbed|planner|coldstart|ablation|frontier|sensitivity|all")]
    = "headline",
    out: Annotated[Path, typer.Option(help="Directory for tables and plots.")]
    = Path("benchmarks/results"),
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Simulate RLHFless vs serverful baselines on a modelled GPU cluster."""
    from rlhfless.sim.cli import CHOICES, simulate_command

    if experiment not in CHOICES:
        raise typer.BadParameter(f"choose one of {', '.join(CHOICES)}",
                                 param_hint="--experiment")
    simulate_command(experiment=experiment, out=out, seed=seed)


if __name__ == "__main__":
    app()
