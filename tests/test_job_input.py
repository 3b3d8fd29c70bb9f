"""Reading job files as the API server would receive them: the YAML loader's bounds, strict
types, and the rules behind names, quantities and image references (each checked against the
pattern a schema uses, matched with RE2 as the API server does)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
from crd_schema import server_admits, server_refusals

from rlhfless.api.errors import SpecError
from rlhfless.api.imageref import NAME_LENGTH_PATTERN, REFERENCE_PATTERN, image_errors
from rlhfless.api.names import JOB_NAME_PATTERN, MAX_JOB_NAME, name_errors
from rlhfless.api.quantity import QUANTITY_PATTERN, parse_quantity
from rlhfless.api.spec import load_job, parse_job, parse_spec
from rlhfless.api.yamlload import MAX_DOCUMENT_BYTES, load_document
from rlhfless.knative.pods import FunctionSettings

re2 = pytest.importorskip("re2", reason="google-re2 (a cel-python dependency)")
CORPUS = Path(__file__).parent / "data" / "bad_jobs"
JOB = "apiVersion: rlhfless.io/v1alpha1\nkind: RLHFJob\nmetadata:\n  name: ok\nspec:\n"


def errors_of(data: bytes) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_document(data, "job.yaml")
    return info.value.errors


# -- the loader ------------------------------------------------------------------------------

def test_scalars_resolve_as_kubectl_reads_them() -> None:
    doc = load_document(b"a: 1e-5\nb: 2024-01-01\nc: 1.5\nd: 10\ne: yes\nf: '3'\ng: 1_000\n"
                        b"h: =\ni: .5\nj: ~\n")
    assert doc == {"a": 1e-05, "b": "2024-01-01", "c": 1.5, "d": 10, "e": True, "f": "3",
                   "g": 1000, "h": "=", "i": 0.5, "j": None}
    assert isinstance(doc["a"], float) and isinstance(doc["d"], int)


def test_an_unquoted_exponent_is_a_learning_rate(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB + "  algorithm:\n    lr: 1e-5\n    criticLr: 3e-6\n")
    algo = load_job(job).spec.algorithm
    assert (algo.lr, algo.critic_lr) == (1e-05, 3e-06)


def test_merge_keys_and_a_byte_order_mark_are_fine() -> None:
    doc = load_document("\ufeffbase: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n".encode())
    assert doc["d"] == {"x": 3, "y": 2}


def test_duplicate_keys_name_the_key_and_both_lines() -> None:
    assert errors_of(b"spec:\n  algorithm:\n    lr: 0.1\n    klBeta: 0\n    lr: 0.2\n") == [
        "spec.algorithm.lr: duplicate key (line 5; first on line 3)"]


def test_values_without_a_json_form_are_refused() -> None:
    assert errors_of(b"a: {1: x}\n") == ["a.1: mapping keys must be strings (line 1); "
                                         "quote the key"]
    for text, where in [(b"a: !!binary aGk=\n", "a: a bytes value"),
                        (b"a: [1, !!set {x}]\n", "a[1]: a set value"),
                        (b"a: !!timestamp 2024-01-01\n", "a: a date value"),
                        (b"a: !!omap [x: 1]\n", "a[0]: a tuple value"),
                        (b"a: -.inf\n", "a: -inf is not a finite number")]:
        assert errors_of(text)[0].startswith(where), text


def test_one_document_per_file_and_a_clear_syntax_error() -> None:
    assert errors_of(b"a: 1\n---\nb: 2\n") == [
        "(file): more than one YAML document; give one job per file"]
    [error] = errors_of(b"a: [\n")
    assert error.startswith("invalid YAML") and '"job.yaml", line 2' in error


def test_not_utf8_names_the_field_line_and_byte() -> None:
    [error] = errors_of("spec:\n  dataset:\n    systemPrompt: Réponds\n".encode("latin-1"))
    assert error == ("spec.dataset.systemPrompt: not UTF-8 text (byte 0xe9 at line 3, column "
                     "20); save the file as UTF-8")
    [error] = errors_of(b"\xff\xfeb\x00")  # UTF-16: nothing readable to point at
    assert error.startswith("(file): not UTF-8 text (byte 0xff at line 1, column 1)")


def test_an_oversized_document_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """etcd stores objects up to 1.5 MiB: an 8 MB job file is refused after reading only
    the first 1.5 MiB of it."""
    big = tmp_path / "big.yaml"
    big.write_bytes((JOB + "  reward:\n    args:\n      blob: '").encode()
                    + b"x" * 8_000_000 + b"'\n")
    started = time.process_time()
    with pytest.raises(SpecError) as info:
        load_job(big)
    assert time.process_time() - started < 0.5
    assert info.value.errors == [f"(file): larger than {MAX_DOCUMENT_BYTES:,} bytes, the API "
                                 "server's object limit"]


def test_expansion_and_depth_are_bounded_on_the_graph_not_the_tree() -> None:
    """A chain of 40 aliases, each used twice, expands to 2^40 values: refused in
    milliseconds, since sizes are computed once per distinct node."""
    chain = "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n"
                                           for i in range(1, 40))
    started = time.process_time()
    [error] = errors_of(chain.encode())
    assert time.process_time() - started < 0.5
    assert "expands to more than 100,000 values" in error
    deep = "a: " + "[" * 65 + "]" * 65 + "\n"
    assert errors_of(deep.encode())[0].endswith("nested more than 64 levels deep")
    # Depth through aliases: 30 levels, reused inside itself 3 times over.
    aliased = ("a: &a " + "[" * 30 + "]" * 30 + "\nb: &b [*a]\n" + "c: &c " + "[" * 30
               + "*b" + "]" * 30 + "\nd: " + "[" * 30 + "*c" + "]" * 30 + "\n")
    assert "nested more than 64 levels deep" in errors_of(aliased.encode())[0]


def test_validate_refuses_an_alias_bomb_fast_and_small(tmp_path: Path) -> None:
    """The real command line, in its own process: exit 2, the field, no traceback; CPU time
    and peak memory (max RSS) of the whole process, interpreter start included."""
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'rlhfless.cli', 'validate', sys.argv[1]],"
        " capture_output=True, text=True)\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "import json; print(json.dumps({'rc': r.returncode, 'out': r.stdout + r.stderr,"
        " 'cpu': u.ru_utime + u.ru_stime, 'rss_kib': u.ru_maxrss}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(CORPUS / "alias-bomb.yaml")],
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout)
    assert result["rc"] == 2 and "spec.reward.args" in result["out"], result
    assert "Traceback" not in result["out"]
    assert result["rss_kib"] < 200 * 1024, result  # the bomb itself would need gigabytes
    assert result["cpu"] < 1.5, result  # about 0.4 s, mostly imports, on an idle machine


# -- strict types and what the API server does with null -------------------------------------

def test_no_coercion_but_integers_are_numbers() -> None:
    job = parse_spec({"scheduling": {"keepAliveS": 30}, "generation": {"temperature": 1},
                      "algorithm": {"klBeta": 0}})
    assert job.spec.scheduling.keep_alive_s == 30.0
    assert isinstance(job.spec.generation.temperature, float)
    for bad in ({"steps": "3"}, {"steps": True}, {"steps": 3.0}, {"suspend": 0},
                {"scheduling": {"lam": "0.5"}}, {"trainer": {"zeroStage": 2.0}}):
        with pytest.raises(SpecError):
            parse_spec(bad)


def test_null_means_the_default_as_on_the_server() -> None:
    spec = {"scheduling": {"maxActors": None}, "algorithm": {"advantage": None}}
    job = parse_spec(spec)
    assert job.spec.scheduling.max_actors == 4 and job.spec.algorithm.advantage == "grpo"
    assert server_admits(spec) == []
    with pytest.raises(SpecError, match="metadata.name"):
        parse_job({"apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob",
                   "metadata": {"name": None}})


def test_wire_names_only() -> None:
    with pytest.raises(SpecError, match="spec.algorithm.clip_eps: unknown field"):
        parse_spec({"algorithm": {"clip_eps": 0.1}})
    with pytest.raises(SpecError, match="apiVersion: Field required"):
        parse_job({"kind": "RLHFJob", "metadata": {"name": "a"}})


# -- names, quantities, image references -----------------------------------------------------

def test_one_name_rule() -> None:
    assert name_errors("a" * MAX_JOB_NAME) == [] and MAX_JOB_NAME == 39
    for bad in ("a" * 40, "9lives", "Tiny", "tiny-", "tiny.grpo", "", "-a"):
        assert name_errors(bad), bad
        assert not (re2.search(JOB_NAME_PATTERN, bad) and len(bad) <= MAX_JOB_NAME), bad
    for good in ("a", "tiny-grpo", "x9", "a-b-c"):
        assert name_errors(good) == [] and re2.search(JOB_NAME_PATTERN, good)
        document = {"apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob",
                    "metadata": {"name": good}, "spec": {}}
        assert server_refusals(document) == [] and parse_job(document)


QUANTITIES = {"4": 4, "500m": Fraction(1, 2), "1.5": Fraction(3, 2), ".5": Fraction(1, 2),
              "2.": 2, "32Gi": 32 * 2**30, "512M": 512 * 10**6, "1k": 1000, "1e3": 1000,
              "1E3": 1000, "2E": 2 * 10**18, "1e-3": Fraction(1, 1000), "+1Ki": 1024,
              "0": 0, "1e400": 2**63 - 1, "9Ei": 2**63 - 1}
NOT_QUANTITIES = ["", "four", "32GB", "-1Gi", "1e", "1.2.3", "Gi", "1 Gi", "1Ki1", "0x10",
                  "1e1.5", "1m0", ".", "1ki", "1KI", "5 ", "\n1"]


@pytest.mark.parametrize("text", QUANTITIES)
def test_quantities_parse_like_kubernetes(text: str) -> None:
    assert parse_quantity(text) == QUANTITIES[text]
    assert re2.search(QUANTITY_PATTERN, text)


@pytest.mark.parametrize("text", NOT_QUANTITIES)
def test_malformed_quantities_are_refused_alike(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)
    assert not re2.search(QUANTITY_PATTERN, text)


IMAGES = ["ubuntu", "ubuntu:22.04", "library/ubuntu", "ghcr.io/rlhfless/rlhfless:0.1.0-gpu",
          "localhost:5000/a/b:tag", "Registry.Example.COM/a", "192.168.1.1:443/x/y",
          "[::1]:5000/a", "a/b__c/d.e-f---g", "x:_tag", "a@sha256:" + "0" * 64,
          "a:1@sha512:" + "f" * 128, "r.io/" + "a" * 250]
NOT_IMAGES = ["", "Ubuntu", "ghcr.io/RLHFless/x", "a:-rc1", "a b", "a@sha256:abc",
              "a@md5:" + "0" * 32, "a@sha256:" + "A" * 64, "a/", "/a", "a//b", "a:" + "t" * 129,
              "a_", "a..b", "-a", "a:tag:tag", "a\n", "r.io/" + "a" * 251]


@pytest.mark.parametrize("ref", IMAGES, ids=lambda r: r[:40])
def test_image_references_follow_the_docker_grammar(ref: str) -> None:
    assert image_errors(ref) == []
    assert re2.search(REFERENCE_PATTERN, ref) and re2.search(NAME_LENGTH_PATTERN, ref)


@pytest.mark.parametrize("ref", NOT_IMAGES, ids=lambda r: r[:40])
def test_malformed_image_references_are_refused_alike(ref: str) -> None:
    assert image_errors(ref)
    assert not (re2.search(REFERENCE_PATTERN, ref) and re2.search(NAME_LENGTH_PATTERN, ref))
    if ref:  # unset means the default image
        # The operator refuses to start with it rather than create pods nobody can pull.
        with pytest.raises(ValueError, match="RLHFLESS_FUNCTION_IMAGE"):
            FunctionSettings.from_env({"RLHFLESS_FUNCTION_IMAGE": ref})
