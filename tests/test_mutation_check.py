"""tools/mutation_check.py stays meaningful: every mutation still applies to this tree
exactly once and names test files that exist (the full check, which runs the tests
against each mutation, is a CI step of its own: `python tools/mutation_check.py`)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import mutation_check  # noqa: E402


@pytest.mark.parametrize("mutation", mutation_check.MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_once_and_names_existing_tests(mutation):
    text = (REPO / mutation.path).read_text()
    assert text.count(mutation.pattern) == 1, f"{mutation.name}: pattern not found once in {mutation.path}"
    assert mutation.replacement != mutation.pattern
    files = [t for t in mutation.tests if t.startswith("tests/")]
    assert files and all((REPO / f.split("::")[0]).is_file() for f in files)


def test_names_are_unique():
    names = [m.name for m in mutation_check.MUTATIONS]
    assert len(names) == len(set(names))


def test_a_surviving_mutation_fails_the_check(tmp_path, monkeypatch, capsys):
    """A mutation the named tests pass on is reported and exits 1; one that no longer applies too."""
    survivor = mutation_check.Mutation(
        "comment-only", "engine/heads.py", '"""Classifier heads', '"""Classifier  heads',
        ("tests/test_hashtag_ce.py", "-k", "head_state_dict"), "changes a docstring only")
    stale = mutation_check.Mutation("stale", "engine/heads.py", "no such text", "x", ("tests/test_hashtag_ce.py",),
                                    "its pattern is gone")
    monkeypatch.setattr(mutation_check, "MUTATIONS", [survivor, stale])
    assert mutation_check.main([]) == 1
    out = capsys.readouterr().out
    assert "SURVIVED  comment-only" in out and "STALE" in out and "0 of 2 mutations caught" in out
