"""Ticket validation: every bad input gets a precise, positioned error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cli.main import main as jbctl
from schema.ticket import MAX_TICKET_BYTES, TicketInvalid, load_ticket, parse_ticket, ticket_json_schema
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import ticket_yaml


def errors_of(text: str | bytes, name: str = "TICKET-1.yaml") -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(TicketInvalid) as info:
        parse_ticket(data, name)
    return [str(e) for e in info.value.errors]


def test_examples_are_valid() -> None:
    files = sorted(EXAMPLES.rglob("TICKET-*.yaml"))
    assert len(files) >= 5
    kinds = set()
    for path in files:
        ticket = load_ticket(path)
        kinds |= {s.kind for s in ticket.steps}
    assert {"synthesize", "train", "evaluate", "check"} <= kinds


def test_defaults_and_durations() -> None:
    t = parse_ticket(
        ticket_yaml(steps="  - {id: a, kind: train, timeout: 15m}\n", extra="expires: 7d\n").encode(), "TICKET-1.yaml"
    )
    assert t.steps[0].timeout == 900 and t.steps[0].effective_queue == "gpu"
    assert t.expires == 7 * 86400
    assert t.constraints.network == "deny"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "1:1: empty file"),
        ("   \n\n", "1:1: empty file"),
        ("id: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        (ticket_yaml(extra="colour: red\n"), "unknown key 'colour'"),
        (ticket_yaml(extra="constraint: {}\n"), "unknown key 'constraint' (did you mean 'constraints'?)"),
        (ticket_yaml(steps="  - {id: a, kind: diag, neds: []}\n"), "5:25: unknown key 'neds' (did you mean 'needs'?)"),
        (ticket_yaml(steps="  - {id: a, kind: bake}\n"), "steps.0.kind"),
        (ticket_yaml(steps="  - {id: a, kind: diag, retries: lots}\n"), "steps.0.retries"),
        (ticket_yaml(steps="  - {id: a, kind: diag}\n  - {id: a, kind: diag}\n"), "duplicate step id 'a'"),
        (
            ticket_yaml(steps="  - {id: a, kind: diag, needs: [b]}\n  - {id: b, kind: diag, needs: [a]}\n"),
            "needs form a cycle: a -> b -> a",
        ),
        (ticket_yaml(steps="  - {id: a, kind: diag, needs: [c]}\n"), "needs unknown step 'c'"),
        (ticket_yaml(steps="  - {id: a, kind: diag, needs: [a]}\n"), "needs itself"),
        (ticket_yaml(steps="  - {id: a, kind: train, with: {data: ../secret.npz}}\n"), "outside the workspace"),
        (ticket_yaml(steps="  - {id: a, kind: train, with: {out: /etc/passwd}}\n"), "outside the workspace"),
        (
            ticket_yaml(steps="  - {id: a, kind: train, with: {data: 'https://example.org/x.tar'}}\n"),
            "synthetic data only",
        ),
        (ticket_yaml(steps="  - {id: a, kind: train, with: {data: imagenet}}\n"), "not in this step's needs"),
        (ticket_yaml(steps="  - {id: a, kind: diag, timeout: soon}\n"), "invalid duration"),
        (ticket_yaml(extra="constraints: {memory: lots}\n"), "invalid memory size"),
        (ticket_yaml(extra="acceptance: [{metric: nope, op: '>=', value: 1}]\n"), "<step>.<name>"),
        (ticket_yaml(extra="acceptance: [{metric: z.acc, op: '>=', value: 1}]\n"), "unknown step 'z'"),
        (ticket_yaml(extra="acceptance: [{metric: a.acc, op: '=>', value: 1}]\n"), "acceptance.0.op"),
        ("id: TICKET-1\nid: TICKET-2\n", "not valid YAML"),
        ("id: 12\ntitle: t\ngoal: g\nsteps: []\n", "id"),
    ],
)
def test_bad_tickets(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith("TICKET-1.yaml:") for e in errors)


def test_error_points_at_line_and_column() -> None:
    text = "id: TICKET-1\ntitle: t\ngoal: g\nsteps:\n  - id: a\n    kind: diag\n    timeout: never\n"
    assert errors_of(text) == [
        "TICKET-1.yaml:7:5: steps.0.timeout: invalid duration 'never': expected a number with s, m, h or d (e.g. 15m)"
    ]


def test_id_must_match_file_name() -> None:
    errors = errors_of(ticket_yaml("TICKET-2"), "TICKET-1.yaml")
    assert errors == ["TICKET-1.yaml:1:1: id 'TICKET-2' does not match the file name 'TICKET-1.yaml'"]


def test_binary_huge_and_non_utf8() -> None:
    assert "binary data" in errors_of(b"\x89PNG\r\n\x1a\n\x00\x00")[0]
    assert "not UTF-8" in errors_of(b"id: \xff\xfe\n")[0]
    huge = ticket_yaml() + "# " + "x" * (10 * 1024 * 1024) + "\n"
    assert f"at most {MAX_TICKET_BYTES:,}" in errors_of(huge)[0]


def test_missing_required_keys_are_listed() -> None:
    errors = errors_of("id: TICKET-1\n")
    assert any("missing required key 'title'" in e for e in errors)
    assert any("missing required key 'steps'" in e for e in errors)


def test_validate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "TICKET-1.yaml"
    good.write_text(ticket_yaml())
    bad = tmp_path / "TICKET-2.yaml"
    bad.write_text(ticket_yaml("TICKET-2", extra="colour: red\n"))
    assert jbctl(["validate", str(good)]) == 0
    assert jbctl(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:7:1: unknown key 'colour'" in err
    assert jbctl(["validate", str(tmp_path / "TICKET-9.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_json_schema_file_is_fresh() -> None:
    on_disk = json.loads((ROOT / "schema" / "ticket.schema.json").read_text())
    assert on_disk == ticket_json_schema(), "stale: run `jbctl schema -o schema/ticket.schema.json`"


def test_schema_command_prints_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False and "steps" in schema["required"]


def test_submit_copies_atomically_and_refuses_invalid(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "TICKET-7.yaml"
    src.write_text(ticket_yaml("TICKET-7"))
    assert jbctl(["submit", str(src)]) == 0
    dest = home / "tickets" / "TICKET-7.yaml"
    assert dest.read_text() == src.read_text()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp")]
    src.write_text("id: TICKET-7\n")
    assert jbctl(["submit", str(src)]) == 1
    assert dest.read_text() == ticket_yaml("TICKET-7")


@pytest.mark.integration
def test_validate_via_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "TICKET-3.yaml"
    bad.write_text("- not\n- a mapping\n")
    from tests.conftest import JBCTL

    proc = subprocess.run([JBCTL, "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{bad}:1:1: a ticket must be a mapping")
