"""User rewards as installed entry points (group `rlhfless.rewards`); never a module path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rlhfless.api.spec import SpecError, parse_spec
from rlhfless.rewards import compute_rewards, get_reward
from rlhfless.rewards.plugins import GROUP, PluginError, load_plugin, plugin_entry_points

MODULE = '''
def shouting(prompt, response, meta, bonus=0.0):
    return float(response.isupper()) + bonus

def needs_answer(prompt, response, meta):
    return float(response == meta["answer"])

NOT_CALLABLE = 3
'''


def install(site: Path, entries: dict[str, str]) -> None:
    """What `pip install` leaves behind: the module and a dist-info with entry_points.txt."""
    (site / "my_rewards.py").write_text(MODULE)
    info = site / "my_rewards-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    install(tmp_path, {"shouting": "my_rewards:shouting", "needs_answer": "my_rewards:needs_answer",
                       "broken": "no_such_module:fn", "constant": "my_rewards:NOT_CALLABLE",
                       "format": "my_rewards:shouting"})
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_entry_points.cache_clear()
    load_plugin.cache_clear()
    yield
    plugin_entry_points.cache_clear()
    load_plugin.cache_clear()
    sys.modules.pop("my_rewards", None)


def test_an_installed_reward_is_found_by_name(installed):
    job = parse_spec({"reward": {"name": "shouting", "args": {"bonus": 0.5}}})
    out = compute_rewards(job.spec.reward, ["p", "p"], ["LOUD", "quiet"])
    assert out == [1.5, 0.5]
    # argument names are still checked against its signature
    with pytest.raises(SpecError, match="unknown args: bonsu; accepts: bonus"):
        parse_spec({"reward": {"name": "shouting", "args": {"bonsu": 1}}})
    # it need not be total on empty text: validation checks names only, not a dry run
    parse_spec({"reward": {"name": "needs_answer"}})
    # and it works inside combined
    job = parse_spec({"reward": {"name": "combined", "args": {
        "weights": {"shouting": 1.0, "needs_answer": 2.0}}}})
    assert compute_rewards(job.spec.reward, ["p"], ["YES"], [{"answer": "YES"}]) == [3.0]


def test_built_in_names_win_and_broken_entry_points_are_named(installed):
    from rlhfless.rewards.rules import format_reward

    assert get_reward("format") is format_reward
    with pytest.raises(PluginError, match="'broken' .*no_such_module:fn.* failed to load"):
        get_reward("broken")
    with pytest.raises(SpecError, match="'constant' .* is not callable"):
        parse_spec({"reward": {"name": "constant"}})
    assert get_reward("shouting")("", "A", {}) == 1.0  # others still load


def test_a_module_path_in_a_spec_is_never_imported(installed):
    for name in ("my_rewards:shouting", "my_rewards.shouting", "os.system", "os:system"):
        with pytest.raises(SpecError, match=f"unknown reward '{name}'; known: .*shouting"):
            parse_spec({"reward": {"name": name}})
    assert "my_rewards" not in sys.modules  # listing entry points imported nothing
