"""`rlhfless` command line: run, validate, manifests, crd, operator, driver, serve, simulate."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rlhfless.api.spec import RLHFJob, SpecError, load_job


def _run_errors() -> tuple[type[Exception], ...]:
    """Failures a user can act on: reported as one message, not a traceback."""
    from rlhfless.driver.rollout import LostSamplesError
    from rlhfless.model.loading import ModelLoadError
    from rlhfless.rewards.datasets import DatasetError
    from rlhfless.runtime.base import InvocationError
    from rlhfless.store import CheckpointError, WeightStoreError

    return (CheckpointError, ModelLoadError, DatasetError, LostSamplesError, InvocationError,
            WeightStoreError)


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Serverless synchronous RLHF (GRPO/PPO) for language models.")
console = Console()
err_console = Console(stderr=True)


def _load_or_exit(path: Path) -> RLHFJob:
    try:
        return load_job(path)
    except SpecError as exc:
        err_console.print(f"[bold red]{escape(exc.source)}: invalid job[/]")
        for line in exc.errors:
            err_console.print(f"  • {escape(line)}")
        raise typer.Exit(2) from None


@app.command()
def validate(job_file: Annotated[Path, typer.Argument(help="RLHFJob YAML file.")]) -> None:
    """Check a job file and report every spec error."""
    job = _load_or_exit(job_file)
    console.print(f"[green]{job_file}: valid[/] (job {job.metadata.name}, "
                  f"{job.spec.algorithm.name}, {job.spec.steps} steps)")


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="RLHFJob YAML file.")],
    run_dir: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory.")] = False,
    steps: Annotated[int | None, typer.Option(help="Override spec.steps.")] = None,
) -> None:
    """Run a job on the embedded local runtime (each stage a local function process)."""
    job = _load_or_exit(job_file)
    if steps is not None:
        job.spec.steps = steps
    run_dir = run_dir or Path("runs") / job.metadata.name
    has_checkpoint = (run_dir / "checkpoint.json").exists()
    if has_checkpoint and not resume:
        if not overwrite:
            err_console.print(f"[red]{run_dir} already holds a run.[/] Use --resume to continue "
                              "it or --overwrite to start again.")
            raise typer.Exit(2)
        shutil.rmtree(run_dir)
    elif run_dir.exists() and overwrite and not resume:
        shutil.rmtree(run_dir)
    try:
        completed = asyncio.run(_run_local(job, run_dir, str(job_file)))
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted; the last completed step is checkpointed. "
                          f"Resume with: rlhfless run {job_file} --resume[/]")
        raise typer.Exit(130) from None
    except _run_errors() as exc:  # evaluated only when something went wrong
        from rlhfless.store import CheckpointError

        err_console.print(f"[bold red]run failed:[/] {escape(str(exc))}")
        if not isinstance(exc, CheckpointError):  # its message says how to go on
            err_console.print(f"Function logs: {run_dir / 'logs'}. Completed steps are "
                              f"checkpointed; continue with: rlhfless run {job_file} --resume")
        raise typer.Exit(1) from None
    _summarise(run_dir, completed, job)


async def _run_local(job: RLHFJob, run_dir: Path, job_file: str) -> int:
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

        def on_step(record) -> None:  # type: ignore[no-untyped-def]
            m = record.metrics
            progress.update(task, completed=record.step, info=(
                f"reward {record.reward_mean:.3f} · step {m['timing_s/step']:.1f}s · "
                f"{m['cost/gpu_seconds']:.1f} GPU-s"))

        with progress:
            return await driver.run(stop=stop, on_step=on_step)


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
    for p in plots:
        console.print(f"plot: {p}")


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

    from rlhfless.knative.manifests import job_manifests
    from rlhfless.knative.pods import FunctionSettings

    job = _load_or_exit(job_file)
    ns = namespace or job.metadata.namespace or "default"
    objects = job_manifests(job, namespace=ns, uid=uid, settings=FunctionSettings.from_env())
    typer.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)


@app.command()
def operator(
    namespace: Annotated[str | None, typer.Option(help="Watch one namespace (default all).")]
    = None,
    liveness: Annotated[str | None, typer.Option(help="kopf liveness endpoint URL.")] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port.")] = 9090,
) -> None:
    """Run the Kubernetes operator (kopf) that reconciles RLHFJob resources."""
    from rlhfless.operator.main import run_operator

    run_operator(namespace=namespace, liveness=liveness, metrics_port=metrics_port)


@app.command()
def driver(
    namespace: Annotated[str, typer.Option(help="Namespace of the job and its functions.")],
    run_dir: Annotated[Path, typer.Option(help="Checkpoint and metrics directory.")]
    = Path("/data/run"),
    store: Annotated[Path, typer.Option(help="Weights store directory.")] = Path("/data/store"),
    job: Annotated[Path | None, typer.Option(
        help="Job file (default: the RLHFJOB_SPEC env var).")] = None,
) -> None:
    """Run one job's driver on the Knative runtime (what the operator's driver pod runs)."""
    import logging

    from rlhfless.driver_pod import job_from, main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        loaded = job_from(job)
    except SpecError as exc:
        err_console.print(f"[bold red]{escape(exc.source)}: invalid job[/]")
        for line in exc.errors:
            err_console.print(f"  • {escape(line)}")
        raise typer.Exit(2) from None
    raise typer.Exit(asyncio.run(main(loaded, namespace=namespace, run_dir=run_dir,
                                      store_dir=store)))


@app.command()
def serve(
    stage: Annotated[str, typer.Option(help="actor|reference|reward|critic|trainer")],
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
    experiment: Annotated[str, typer.Option(help="paper|ablation|sensitivity|frontier|all")]
    = "paper",
    out: Annotated[Path, typer.Option(help="Directory for tables and plots.")]
    = Path("benchmarks/results"),
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Simulate RLHFless vs serverful baselines on a modelled GPU cluster."""
    from rlhfless.sim.cli import simulate_command

    simulate_command(experiment=experiment, out=out, seed=seed)


if __name__ == "__main__":
    app()
