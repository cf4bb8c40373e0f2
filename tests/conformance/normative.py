"""The conformance map: every numbered normative statement of MQTT 5.0 and 3.1.1, with the
tests that check it or the reason it needs none.

The statements are in `statements.tsv` (one line each: version, id, applies-to, status,
note, a one-line summary in our words). The tests name what they check with a marker:

    @pytest.mark.spec("MQTT-3.1.2-4", v311="MQTT-3.1.2-6")

positional ids are 5.0 statements, `v311=` (an id or a list of ids) 3.1.1 ones. Status:

- `test`: at least one test in this directory carries a marker for it;
- `rust`: checked by a Rust test (end-to-end or unit); the note is `path/FILE.rs::function`;
- `n/a`: needs no server test; the note says why ("client requirement" for statements only
  a client must meet; a server feature the edge does not offer; ...);
- `gap`: a server statement nothing checks yet; the note says what is missing.

`python3 tests/conformance/normative.py` writes NORMATIVE.md from both; test_normative.py
fails when NORMATIVE.md is not what this would write, when a `test` statement has no
marked test, when a marker names an unknown statement, or when a note is missing.
"""

from __future__ import annotations

import ast
import csv
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STATEMENTS = HERE / "statements.tsv"
OUTPUT = HERE / "NORMATIVE.md"
VERSIONS = ("5.0", "3.1.1")
APPLIES = ("server", "client", "both")
STATUSES = ("test", "rust", "n/a", "gap")


# Where the edge departs from a statement on purpose, and the known bugs a test shows
# (marked xfail there); both are printed under the summary of NORMATIVE.md.
DEVIATIONS = [
    ("MQTT-4.5.0-1", "the queues of a session are bounded (`mqtt.max_queued_messages`, "
     "`mqtt.max_offline_messages`, `mqtt.max_queued_bytes`): past the bound QoS 0 deliveries "
     "are dropped, QoS 1/2 kept up to twice the bound, then dropped and counted, so one slow "
     "or absent subscriber cannot exhaust the node (as Mosquitto's settings of the same "
     "names); tests `test_session.py::test_mqtt_4_1_offline_session_queue_bounded_by_max_"
     "offline_messages`, `test_mqtt5.py::test_mqtt_4_9_slow_subscriber_queue_bounded_by_max_"
     "queued_messages`"),
    ("MQTT-4.4.0-1", "after a crash (not a clean restart) an unacknowledged QoS 1 delivery "
     "may be re-sent with a new Packet Identifier: which identifier a send had is not worth "
     "an fsync per delivery; the message itself is re-sent (at least once holds); test "
     "`test_restart.py::test_mqtt_4_4_0_1_unacknowledged_qos1_delivered_again_after_a_"
     "broker_kill`"),
]
KNOWN_BUGS: list[tuple[str, str]] = []


@dataclass
class Statement:
    version: str
    id: str
    applies: str
    status: str
    note: str
    summary: str
    tests: list[str] = field(default_factory=list)

    @property
    def server(self) -> bool:
        return self.applies in ("server", "both")


def sort_key(sid: str) -> tuple:
    """MQTT-3.1.2-10 after MQTT-3.1.2-9: numeric parts compared as numbers."""
    section, _, n = sid.removeprefix("MQTT-").rpartition("-")
    return tuple(int(p) for p in section.split(".")) + (int(n),)


def load_statements(path: Path = STATEMENTS) -> list[Statement]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [Statement(r["version"], r["id"], r["applies"], r["status"], r["note"] or "",
                      r["summary"]) for r in rows]


def _is_spec_marker(node: ast.expr) -> bool:
    # pytest.mark.spec(...)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "spec" and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "mark")


def _strings(node: ast.expr, where: str) -> list[str]:
    value = ast.literal_eval(node)
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: spec marker arguments must be strings")


def collect_markers(directory: Path = HERE) -> dict[tuple[str, str], list[str]]:
    """(version, id) -> ["test_file.py::test_name", ...] from the spec markers of the tests."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(directory.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            name = f"{path.name}::{node.name}"
            for deco in node.decorator_list:
                if not _is_spec_marker(deco):
                    continue
                for arg in deco.args:
                    for sid in _strings(arg, name):
                        found[("5.0", sid)].append(name)
                for kw in deco.keywords:
                    if kw.arg != "v311":
                        raise ValueError(f"{name}: unknown spec marker keyword {kw.arg!r}")
                    for sid in _strings(kw.value, name):
                        found[("3.1.1", sid)].append(name)
    return found


def problems(statements: list[Statement],
             markers: dict[tuple[str, str], list[str]]) -> list[str]:
    """Everything wrong with the list and the markers, as sentences; empty when all is well."""
    out = []
    seen = set()
    for s in statements:
        key = (s.version, s.id)
        where = f"{s.version} {s.id}"
        if key in seen:
            out.append(f"{where}: listed twice")
        seen.add(key)
        if s.version not in VERSIONS:
            out.append(f"{where}: unknown version")
        if s.applies not in APPLIES:
            out.append(f"{where}: applies-to must be one of {APPLIES}")
        if s.status not in STATUSES:
            out.append(f"{where}: status must be one of {STATUSES}")
        if not s.summary.strip():
            out.append(f"{where}: no summary")
        tests = markers.get(key, [])
        if s.applies == "client" and s.status != "n/a":
            out.append(f"{where}: a client requirement has status n/a (note: why)")
        if s.status == "test" and not tests:
            out.append(f"{where}: status test but no test carries @pytest.mark.spec for it")
        if s.status in ("rust", "n/a", "gap") and not s.note.strip():
            out.append(f"{where}: status {s.status} needs a note")
        if s.status in ("rust", "gap") and tests:
            out.append(f"{where}: status {s.status} but marked by {tests}: make it `test`")
        if s.status == "n/a" and s.server and tests:
            out.append(f"{where}: a server statement marked n/a is marked by {tests}")
        if s.status == "rust":
            file, _, fn = s.note.partition("::")
            source = REPO / file
            if not fn or not source.is_file() or f"fn {fn}(" not in source.read_text():
                out.append(f"{where}: rust note {s.note!r} names no test function")
    for key, tests in sorted(markers.items()):
        if key not in seen:
            out.append(f"{key[0]} {key[1]}: named by {tests} but not in statements.tsv")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(statements: list[Statement], markers: dict[tuple[str, str], list[str]]) -> str:
    for s in statements:
        s.tests = sorted(set(markers.get((s.version, s.id), [])))
    lines = [
        "# MQTT conformance map",
        "",
        "<!-- Generated by `python3 tests/conformance/normative.py` from statements.tsv and",
        "     the @pytest.mark.spec markers of tests/conformance; test_normative.py fails when",
        "     this file is stale. Do not edit by hand. -->",
        "",
        "Every numbered normative statement (`[MQTT-x.x.x-y]`) of MQTT 5.0 and MQTT 3.1.1,",
        "with the tests of this directory that check it on the edge, or why no server test",
        "applies. The summaries are paraphrases; the OASIS specifications are the reference.",
        "A test is `file::function`; `rust:` names a Rust test (`path::function`).",
        "",
        "| | statements | server statements | checked by a test here | checked by a Rust test "
        "| not applicable to the edge | gaps | client requirements |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VERSIONS:
        mine = [s for s in statements if s.version == v]
        server = [s for s in mine if s.server]
        count = lambda st: sum(1 for s in server if s.status == st)  # noqa: E731
        clients = sum(1 for s in mine if not s.server)
        lines.append(f"| MQTT {v} | {len(mine)} | {len(server)} | {count('test')} | "
                     f"{count('rust')} | {count('n/a')} | {count('gap')} | {clients} |")
    lines += ["", "Deliberate deviations:", ""]
    lines += [f"- [{sid}] {text}." for sid, text in DEVIATIONS]
    lines += ["", "Known bugs:", ""]
    lines += [f"- [{sid}] {text}." for sid, text in KNOWN_BUGS] or ["- none known"]
    for v in VERSIONS:
        lines += ["", f"## MQTT {v}", "", "| id | applies to | statement (paraphrased) | "
                  "checked by |", "|---|---|---|---|"]
        mine = sorted((s for s in statements if s.version == v), key=lambda s: sort_key(s.id))
        for s in mine:
            if s.status == "test":
                how = ", ".join(f"`{t}`" for t in s.tests)
            elif s.status == "rust":
                how = f"rust: `{s.note}`"
            elif s.status == "gap":
                how = f"**GAP**: {s.note}"
            else:
                how = f"n/a: {s.note}"
                if s.tests:
                    how += "; the server's side: " + ", ".join(f"`{t}`" for t in s.tests)
            lines.append(f"| {s.id} | {s.applies} | {_cell(s.summary)} | {_cell(how)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    statements = load_statements()
    markers = collect_markers()
    for p in problems(statements, markers):
        print(f"normative: {p}", file=sys.stderr)
    OUTPUT.write_text(render(statements, markers), encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
