"""The start-up replay's shortcut: progress reports that a later one replaces are not decoded.

Most of a long log is `ProgressRecorded` (94 % of bench/store.py's realistic one), and folding one
does three things (`daemon.state.evolve`, `_progress`): its ticket's stream version goes up by one,
its task's `progress` becomes the report's (step, total), and its task's `last_report_seq` becomes
the report's when that is higher. So when the *next event of the same ticket* is another progress
report of the same task with a `report_seq` at least as high, that later report sets `progress` and
`last_report_seq` to what they would have been with the earlier one folded too: of the earlier one,
only the version count is left. Between the two nothing can tell the difference, because only the
handlers of a ticket's own events read or write its tasks' progress and report counters (events of
other tickets and of the system streams never touch them; an event without a ticket ends every
pending pair here all the same, to be safe).

`plan` reads a batch of stored rows backwards and marks each such report (92 % of bench/store.py's
log); `load_state` then counts a run of them in their stream's version and moves on, without
decoding them or calling `evolve`. Everything else
is decoded and folded as before, in log order, so the state is the one the full fold gives
(`tests/test_replay_fast.py` compares them event by event on realistic and hostile logs;
`jbctl replay --check` compares them on a real log). What is not done for a skipped report is its
full validation: its ticket, task and report_seq are checked (they decide the skip), its other
fields are not. `jbctl replay --check` decodes every stored event in full, and `jbctl verify`
checks the hash chain over all of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any

from pydantic_core import SchemaValidator
from pydantic_core import core_schema as cs

from daemon.state import State
from schema import events as ev
from schema.store import Decoder, decode_row, event_decoders

PROGRESS = ev.ProgressRecorded.__name__

# Skipped reports next to each other in the log, all of one ticket: [ticket, the first one's stored
# data, how many, the first one's seq]. Only their count is folded (their stream's version), unless
# their ticket is cold when they come: then the first is decoded and folded whole, to thaw the ticket
# where the full fold does (see `load_state`), and the others are counted.
Superseded = list[Any]
Row = tuple[int, str, Any]

# What a progress report's skip depends on, and only that (the rest of its JSON is stepped over,
# not built): a third of the cost of decoding it whole.
_KEY = SchemaValidator(
    cs.typed_dict_schema(
        {
            "ticket": cs.typed_dict_field(cs.str_schema()),
            "task": cs.typed_dict_field(cs.str_schema()),
            "report_seq": cs.typed_dict_field(cs.with_default_schema(cs.int_schema(), default=0), required=False),
        }
    )
)


def plan(rows: list[Row], decoders: Mapping[str, Decoder]) -> list[tuple[int, ev.Event | Superseded]]:
    """(seq, item) for the stored (seq, type, data) `rows`, in order: each row's event, decoded, except
    the progress reports that the next event of their ticket in `rows` supersedes (module docstring):
    each run of those next to each other is one `Superseded` item, at the seq of its last row.
    A row that does not decode raises `StoreError` naming its seq."""
    out: list[tuple[int, ev.Event | Superseded]] = []  # backwards, then turned round
    append = out.append
    # Per ticket, the next event of it after the row at hand: (task, report_seq) when that is a
    # progress report, None when it is anything else.
    later: dict[str, tuple[str, int] | None] = {}
    run: Superseded | None = None  # the item appended last, when it is a run of skipped reports
    key_of = _KEY.validate_json if rows and type(rows[0][2]) is str else _KEY.validate_python
    for seq, type_, data in reversed(rows):
        if type_ == PROGRESS:
            try:
                key = key_of(data)
            except ValueError:
                decode_row(seq, type_, data, decoders)  # raises, naming the seq and what is wrong
                raise  # (never: the key's fields are the event's own)
            ticket, task, report = key["ticket"], key["task"], key["report_seq"]
            nxt = later.get(ticket)
            later[ticket] = (task, report)
            if nxt is not None and nxt[0] == task and nxt[1] >= report:
                if run is not None and run[0] == ticket:  # an earlier report of the same run (read backwards)
                    run[1], run[3] = data, seq
                    run[2] += 1
                else:
                    run = [ticket, data, 1, seq]
                    append((seq, run))
                continue
            event = decode_row(seq, type_, data, decoders)
        else:
            event = decode_row(seq, type_, data, decoders)
            ticket = getattr(event, "ticket", None)
            if isinstance(ticket, str):
                later[ticket] = None
            else:
                later.clear()
        append((seq, event))
        run = None
    out.reverse()
    return out


def items(batches: Iterable[list[Row]]) -> Iterator[tuple[int, ev.Event | Superseded]]:
    """(seq, event or `Superseded`) for the rows of `batches`, in order (`plan` of each batch: a
    report last of its ticket in one batch is folded whole, whatever the next batch holds)."""
    decoders = event_decoders()
    return itertools.chain.from_iterable(plan(rows, decoders) for rows in batches)


def decode_first(item: Superseded) -> ev.Event:
    """The first report of a `Superseded` run, decoded whole."""
    return decode_row(item[3], PROGRESS, item[1], event_decoders())


def differences(fast: State, full: State, limit: int = 20) -> list[str]:
    """How the start-up replay's state (`fast`) differs from the full fold's (`full`): each field
    that differs (a ticket or stream by name), strictly: the same tickets frozen, in the same order."""
    out: list[str] = []
    for f in fields(State):
        if not f.compare:
            continue
        a, b = getattr(fast, f.name), getattr(full, f.name)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys(), key=repr):
                if a.get(key) != b.get(key) or (key in a) != (key in b):
                    out.append(f"state.{f.name}[{key!r}]: start-up replay {a.get(key)!r}, full fold {b.get(key)!r}")
            if not out and list(a) != list(b):
                out.append(f"state.{f.name}: the same entries in another order")
        elif a != b:
            out.append(f"state.{f.name}: start-up replay {a!r}, full fold {b!r}")
    return out[:limit]
