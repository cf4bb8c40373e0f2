"""The conformance map (NORMATIVE.md) is complete and current; see normative.py.

No broker is started: this reads statements.tsv and the spec markers of the tests.
"""

import normative


def test_every_statement_has_a_test_or_a_reason_and_every_marker_a_statement():
    statements = normative.load_statements()
    found = normative.problems(statements, normative.collect_markers())
    assert not found, "statements.tsv or the spec markers:\n" + "\n".join(found)


def test_every_version_lists_its_statements():
    statements = normative.load_statements()
    for version in normative.VERSIONS:
        assert sum(1 for s in statements if s.version == version) > 100, version


def test_normative_md_is_what_the_generator_writes_now():
    expected = normative.render(normative.load_statements(), normative.collect_markers())
    actual = normative.OUTPUT.read_text(encoding="utf-8") if normative.OUTPUT.exists() else ""
    assert actual == expected, (
        "tests/conformance/NORMATIVE.md is stale: run `python3 tests/conformance/normative.py`")
