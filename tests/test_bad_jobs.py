"""A corpus of malformed RLHFJobs, each refused alike by the CLI, the API server's CRD schema
and the operator.

One file per case in tests/data/bad_jobs/, its header naming the field the refusal must name
(`# expect: spec.algorithm.clipEps`) and, where a judge never gets to see the file as such,
why (`# not-schema: ...`, `# not-operator: ...`; e.g. duplicate keys never become a request).
For every case:
- `rlhfless validate` exits 2 naming the field, without a traceback, within 1 s of CPU and a
  bounded amount of memory;
- the API server (tests/crd_schema.py: strict fields, defaults, Draft-4 schema, CEL) refuses
  the object, naming the field;
- the real kopf operator, running once for the whole corpus against kmock, reports
  Ready=False/InvalidSpec naming the field, and creates nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_schema import server_refusals
from kmock_cluster import BATCH_JOBS, emulated_cluster
from typer.testing import CliRunner

from rlhfless.api.errors import SpecError
from rlhfless.api.spec import load_job
from rlhfless.api.yamlload import load_document
from rlhfless.cli import app
from rlhfless.knative.services import LABEL_JOB
from rlhfless.operator.config import OperatorConfig
from rlhfless.operator.metrics import OperatorMetrics

CORPUS = Path(__file__).parent / "data" / "bad_jobs"
CPU_SECONDS = 1.0
PEAK_BYTES = 64 * 2**20
CONTROL = "control-suspended"  # a valid job: proves the operator creates what it should


@dataclass(frozen=True)
class Case:
    path: Path
    expect: str
    not_schema: str | None
    not_operator: str | None

    @property
    def name(self) -> str:
        return self.path.stem


def read_case(path: Path) -> Case:
    header: dict[str, str] = {}
    for raw in path.read_bytes().splitlines():
        if not raw.startswith(b"#"):
            break
        key, _, value = raw.decode("utf-8", "replace").lstrip("# ").partition(":")
        if key in ("expect", "not-schema", "not-operator"):
            header[key] = value.strip()
    assert "expect" in header, f"{path.name}: no '# expect: <field>' header"
    return Case(path, header["expect"], header.get("not-schema"), header.get("not-operator"))


CASES = [read_case(p) for p in sorted(CORPUS.glob("*.yaml"))]


def test_the_corpus_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 40
    documents = [_document(c) for c in CASES if c.not_operator is None]
    names = [d["metadata"]["name"] for d in documents]
    assert len(names) == len(set(names)) and CONTROL not in names


def _document(case: Case) -> Any:
    """What kubectl would send for the file. A file the CLI refuses while reading it says
    why the schema cannot judge it; if the operator can, kubectl's reading is PyYAML's."""
    data = case.path.read_bytes()
    try:
        return load_document(data, case.name)
    except SpecError:
        assert case.not_schema, f"{case.name}: refused while reading, needs a not-schema reason"
        return None if case.not_operator else yaml.safe_load(data)


def _flat(text: str) -> str:
    return " ".join(text.split())  # undo the console's line wrapping


# -- the operator, once for the whole corpus ----------------------------------------------

async def _judge_with_operator(cases: list[Case]) -> dict[str, Any]:
    async with emulated_cluster() as cluster:
        hooks = cluster.hooks(config=OperatorConfig(watch_interval_s=0.2),
                              metrics=OperatorMetrics())
        async with cluster.operator(hooks):
            documents = {c.name: _document(c) for c in cases}
            names = {}
            for case in cases:
                document = documents[case.name]
                names[case.name] = document["metadata"]["name"]
                await cluster.create_job(names[case.name], document.get("spec") or {})
            await cluster.create_job(CONTROL, {"suspend": True})

            def ready(name: str) -> dict[str, Any]:
                for c in cluster.status(name).get("conditions") or []:
                    if c["type"] == "Ready":
                        return c
                return {}

            def judged() -> bool:
                return (cluster.phase(CONTROL) == "Suspended"
                        and all(ready(n).get("reason") == "InvalidSpec" for n in names.values()))

            await cluster.wait_for(judged, timeout=180, interval=0.1,
                                   what="InvalidSpec on every bad job")
            owners = {s["metadata"]["labels"][LABEL_JOB] for s in cluster.services()}
            return {"ready": {case: ready(name) for case, name in names.items()},
                    "owners": owners, "drivers": cluster.list(BATCH_JOBS),
                    "phase": {case: cluster.phase(name) for case, name in names.items()}}


@pytest.fixture(scope="module")
def operator_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cases = [c for c in CASES if c.not_operator is None]
    verdicts = asyncio.run(_judge_with_operator(cases))
    # The control job got its Services, so an operator that created nothing at all cannot
    # pass for one that refused the bad jobs; suspended, it got no driver, and nor did they.
    assert verdicts["owners"] == {CONTROL}
    assert verdicts["drivers"] == []
    return verdicts


# -- one test per case, all three judges ---------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_job_is_refused_alike_everywhere(case: Case,
                                              operator_verdicts: dict[str, Any]) -> None:
    # The CLI: exit 2, the field, no traceback.
    result = runner.invoke(app, ["validate", str(case.path)])
    output = _flat(result.output)
    assert result.exit_code == 2, output
    assert case.expect in output, output
    assert "Traceback" not in output
    assert isinstance(result.exception, SystemExit), result.exception  # typer.Exit(2)

    # ... quickly and in bounded memory (CPU time: other work on the machine does not count).
    started = time.process_time()
    with contextlib.suppress(SpecError):
        load_job(case.path)
    assert time.process_time() - started < CPU_SECONDS
    tracemalloc.start()
    try:
        with contextlib.suppress(SpecError):
            load_job(case.path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak / 2**20:.1f} MiB"

    # The API server.
    if case.not_schema is None:
        refusals = server_refusals(_document(case))
        assert refusals, "the CRD admits it"
        assert any(case.expect in r for r in refusals), refusals

    # The operator.
    if case.not_operator is None:
        ready = operator_verdicts["ready"][case.name]
        assert ready.get("status") == "False" and ready.get("reason") == "InvalidSpec", ready
        assert case.expect in ready["message"], ready["message"]
        assert operator_verdicts["phase"][case.name] == "Failed"
