"""The web console: FastAPI pages over the projections, the same data as JSON, live updates by SSE.

It reads what `jbctl` reads and changes state only through `daemon.gate` (the functions `jbctl approve`,
`reject`, `cancel` and `retry` call) or by writing a ticket into the watched folder (`jbctl submit`).
It never imports `workers` or torch.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from console import auth, data
from console.live import Broadcaster
from console.playground import EXAMPLE, GRADIO_PATH, LazyGradio, Playground
from console.playground import picture_params as picture_params
from console.playground import sudoku_solved as sudoku_solved
from schema import readmodel as rm
from schema.settings import Settings
from schema.store import EventStore, open_readonly

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
SQL_MAX_ROWS = 1000
LOCAL_HOSTS = {"127.0.0.1", "::1", "localhost"}
Call = tuple[Any, tuple[Any, ...], dict[str, Any]]  # a `daemon.gate` function, its arguments, its keywords


@dataclass
class Config:
    """How this console runs: `login_to_read` when bound beyond localhost."""

    settings: Settings
    login_to_read: bool = False
    poll_interval: float = 0.1


class Writer:
    """One command handler per server process, caught up with the log before each command."""

    def __init__(self, url: str, synchronous: str) -> None:
        self.url, self.synchronous = url, synchronous
        self._handler: Any = None
        self._lock = threading.Lock()

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from daemon.handler import CommandHandler

        with self._lock:
            if self._handler is None:
                self._handler = CommandHandler(EventStore(self.url, self.synchronous))
            else:
                self._handler.refresh()
            return fn(self._handler, *args, **kwargs)


def create_app(config: Config) -> FastAPI:
    settings = config.settings
    engine = open_readonly(settings.db_url)
    broadcaster = Broadcaster(engine, config.poll_interval)
    writer = Writer(settings.db_url, settings.sqlite_synchronous)
    milestones = data.Milestones(engine)
    key = auth.session_key(settings.home)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, default=str)
    templates.env.filters["num"] = _num
    templates.env.filters["when"] = _when

    gradio_playground = LazyGradio(
        Playground(settings, engine), lambda scope: not config.login_to_read or session_of(Request(scope)) is not None
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        broadcaster.start()
        yield
        await gradio_playground.close()
        broadcaster.stop()
        engine.dispose()

    app = FastAPI(title="Jetbox console", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.state.config, app.state.broadcaster, app.state.writer = config, broadcaster, writer
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # --- helpers ---------------------------------------------------------------------------------

    def session_of(request: Request) -> auth.Session | None:
        return auth.read_session(key, request.cookies.get(auth.SESSION_COOKIE))

    def bearer_user(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return auth.user_for_token(settings.home, header[7:])
        return None

    def wants_json(request: Request) -> bool:
        if request.url.path.startswith("/api/"):
            return True
        accept = request.headers.get("accept", "")
        return "application/json" in accept and "text/html" not in accept

    def page(request: Request, template: str, payload: dict[str, Any], status: int = 200) -> Response:
        if wants_json(request):
            return JSONResponse(jsonable_encoder(payload), status_code=status)
        session = session_of(request)
        context = {
            **payload,
            "request": request,
            "session": session,
            "csrf": auth.csrf_token(key, session) if session else "",
            "nav": request.url.path,
            "flash": request.query_params.get("msg"),
            "flash_ok": request.query_params.get("ok") == "1",
        }
        return templates.TemplateResponse(request, template, context, status_code=status)

    def reader_refused(request: Request) -> Response | None:
        if not config.login_to_read or session_of(request) or bearer_user(request):
            return None
        if wants_json(request):
            return JSONResponse({"error": "log in first: this console is bound beyond localhost"}, status_code=401)
        return RedirectResponse(f"/login?next={quote(str(request.url.path))}", status_code=303)

    async def writer_user(request: Request) -> tuple[str | None, dict[str, Any]]:
        """The acting user (bearer token, or session cookie plus CSRF token) and the submitted form."""
        form: dict[str, Any] = {}
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = await request.json()
                form = body if isinstance(body, dict) else {}
            except ValueError:
                form = {}
        else:
            form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        user = bearer_user(request)
        if user:
            return user, form
        session = session_of(request)
        token = form.get("csrf") or request.headers.get("x-csrf-token")
        if session and auth.csrf_ok(key, session, token):
            return session.user, form
        return None, form

    def refused(request: Request, why: str) -> Response:
        if wants_json(request):
            return JSONResponse({"ok": False, "error": why}, status_code=403)
        return templates.TemplateResponse(
            request,
            "refused.html",
            {
                "request": request,
                "why": why,
                "session": session_of(request),
                "csrf": "",
                "nav": "",
                "flash": None,
                "flash_ok": False,
            },
            status_code=403,
        )

    def meta_for(request: Request, user: str) -> dict[str, Any]:
        client = request.client.host if request.client else None
        return {"actor": {"user": user, "via": "console", "host": socket.gethostname(), "remote": client}}

    def outcome_response(request: Request, outcome: Any, back: str) -> Response:
        if wants_json(request):
            return JSONResponse(
                {"ok": outcome.ok, "message": outcome.message, "events": [r.as_json() for r in outcome.events]},
                status_code=200 if outcome.ok else 409,
            )
        return RedirectResponse(f"{back}?{urlencode({'msg': outcome.message, 'ok': int(outcome.ok)})}", 303)

    # --- writes: every change is one `daemon.gate` command, as in jbctl ---------------------------

    def command(path: str, why: str, back: str) -> Any:
        """Register `POST path` and its `/api` twin for a change of state.

        The decorated function turns (user, form, path parameters) into the `daemon.gate` call to make,
        `(function, args, kwargs)`, or an `Outcome` when the input is refused before any command. The
        route does the rest the same way for every change: the acting user (a bearer token, or a session
        with its CSRF token; else 403 and nothing is recorded), the command run by this process's one
        handler with the web user as actor, and the outcome as JSON or a redirect to `back` with a message.
        """

        def register(build: Any) -> Any:
            async def route(request: Request) -> Any:
                from daemon.gate import Outcome

                params = dict(request.path_params)
                user, form = await writer_user(request)
                if user is None:
                    return refused(request, why)
                call: Call | Outcome = build(user, form, **params)
                if not isinstance(call, Outcome):
                    fn, args, kwargs = call
                    call = await asyncio.to_thread(
                        writer.run, fn, *args, actor=user, meta=meta_for(request, user), **kwargs
                    )
                return outcome_response(request, call, back.format(**params))

            route.__name__ = build.__name__
            for url in (path, "/api" + path):
                app.add_api_route(url, route, methods=["POST"], name=f"{build.__name__}:{url}")
            return build

        return register

    def text(form: dict[str, Any], *names: str) -> str:
        for name in names:
            value = str(form.get(name) or "").strip()
            if value:
                return value
        return ""

    @command("/tickets/{tid}/cancel", "log in first: cancelling a ticket needs a console token", "/tickets/{tid}")
    def ticket_cancel(user: str, form: dict[str, Any], tid: str) -> Call:
        from daemon import gate

        return gate.cancel, (tid,), {"reason": text(form, "reason") or f"cancelled by {user} in the console"}

    @command("/tickets/{tid}/retry", "log in first: retrying a task needs a console token", "/tickets/{tid}")
    def ticket_retry(user: str, form: dict[str, Any], tid: str) -> Call:
        from daemon import gate

        return gate.retry, (tid, text(form, "task")), {}

    @command("/tickets/{tid}/hold", "log in first: holding a ticket needs a console token", "/tickets/{tid}")
    def ticket_hold(user: str, form: dict[str, Any], tid: str) -> Call:
        from daemon import gate

        stop = str(form.get("stop") or "").lower() in ("1", "on", "true", "yes")
        return gate.hold, (tid,), {"reason": text(form, "reason") or None, "stop": stop}

    @command("/tickets/{tid}/release", "log in first: releasing a ticket needs a console token", "/tickets/{tid}")
    def ticket_release(user: str, form: dict[str, Any], tid: str) -> Call:
        from daemon import gate

        return gate.release, (tid,), {}

    @command("/tickets/{tid}/priority", "log in first: changing a priority needs a console token", "/tickets/{tid}")
    def ticket_priority(user: str, form: dict[str, Any], tid: str) -> Any:
        from daemon import gate

        raw = form.get("priority")
        try:
            # A whole number only (True, 1.5 and "1e3" are refused, as `jbctl priority` refuses them).
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                raise ValueError
            priority = int(raw)
        except ValueError:
            return gate.Outcome(False, f"priority must be a whole number, not {raw!r}")
        return gate.set_priority, (tid, priority), {}

    @command("/pause", "log in first: pausing the installation needs a console token", "/")
    def installation_pause(user: str, form: dict[str, Any]) -> Call:
        from daemon import gate

        return gate.pause, (), {"reason": text(form, "reason") or None}

    @command("/resume", "log in first: resuming the installation needs a console token", "/")
    def installation_resume(user: str, form: dict[str, Any]) -> Call:
        from daemon import gate

        return gate.resume, (), {}

    @command(
        "/proposals/{pid}/approve", "log in first: approving needs an approver's console token", "/proposals/{pid}"
    )
    def proposal_approve(user: str, form: dict[str, Any], pid: str) -> Call:
        from daemon import gate

        kwargs = {
            "approver_list": gate.approvers(settings),
            "home": settings.home,
            "note": text(form, "note") or None,
            "scope": "all" if form.get("scope") == "all" else "ticket",
        }
        return gate.approve, (pid,), kwargs

    @command("/proposals/{pid}/reject", "log in first: rejecting needs an approver's console token", "/proposals/{pid}")
    def proposal_reject(user: str, form: dict[str, Any], pid: str) -> Any:
        from daemon import gate

        reason = text(form, "note", "reason")
        if not reason:
            return gate.Outcome(False, "a reason is required to reject")
        return gate.reject, (pid,), {"reason": reason}

    # --- pages -----------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {
            "ok": broadcaster.error is None,
            "last_seq": broadcaster.last_seq,
            "error": broadcaster.error,
            "subscribers": broadcaster.subscribers,
        }

    @app.get("/", response_class=HTMLResponse)
    @app.get("/api/tickets")
    def tickets_page(request: Request, state: str = "", q: str = "", offset: int = 0, limit: int = PAGE_SIZE) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        limit = max(1, min(limit, 500))
        payload = data.tickets(engine, state or None, q.strip() or None, limit, max(0, offset))
        payload["states"] = rm.TICKET_STATES
        return page(request, "tickets.html", payload)

    @app.get("/tickets/{tid}", response_class=HTMLResponse)
    @app.get("/api/tickets/{tid}")
    def ticket_page(request: Request, tid: str) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        found = data.ticket(engine, tid)
        if found is None:
            return page(
                request, "missing.html", {"what": f"ticket {tid}", "ticket": tid, "error": f"no ticket {tid!r}"}, 404
            )
        return page(request, "ticket.html", found)

    @app.get("/proposals", response_class=HTMLResponse)
    @app.get("/api/proposals")
    def proposals_page(request: Request, all: int = 1) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        return page(request, "proposals.html", {"proposals": data.proposals(engine, bool(all)), "all": bool(all)})

    @app.get("/proposals/{pid}", response_class=HTMLResponse)
    @app.get("/api/proposals/{pid}")
    def proposal_page(request: Request, pid: str) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        found = data.proposal(engine, pid)
        if found is None:
            return page(request, "missing.html", {"what": f"proposal {pid}", "error": f"no proposal {pid!r}"}, 404)
        return page(request, "proposal.html", found)

    @app.get("/core", response_class=HTMLResponse)
    @app.get("/api/core")
    def core_page(request: Request) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        return page(request, "core.html", data.core(engine))

    @app.get("/milestones", response_class=HTMLResponse)
    @app.get("/api/milestones")
    async def milestones_page(request: Request) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        return page(request, "milestones.html", await asyncio.to_thread(milestones.listing))

    @app.get("/milestones/{mid}", response_class=HTMLResponse)
    @app.get("/api/milestones/{mid}")
    async def milestone_page(request: Request, mid: str) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        found = await asyncio.to_thread(milestones.one, mid)
        if found is None:
            return page(request, "missing.html", {"what": f"milestone {mid}", "error": f"no milestone {mid!r}"}, 404)
        return page(request, "milestone.html", found)

    @app.get("/milestones/{mid}/report")
    async def milestone_report(request: Request, mid: str, format: str = "html") -> Any:
        """The report `jbctl milestone MID --report html|md` writes (not stored as an artifact from here)."""
        if (r := reader_refused(request)) is not None:
            return r
        if format not in ("html", "md"):
            return Response(f"format: {format!r}; use html or md\n", status_code=400, media_type="text/plain")
        body = await asyncio.to_thread(milestones.report, mid, format)
        if body is None:
            return Response(f"no milestone {mid!r}\n", status_code=404, media_type="text/plain")
        media = "text/html; charset=utf-8" if format == "html" else "text/markdown; charset=utf-8"
        return Response(body, media_type=media)

    @app.get("/workers", response_class=HTMLResponse)
    @app.get("/api/workers")
    async def workers_page(request: Request) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        payload = await asyncio.to_thread(data.workers, settings.redis_url_or_private())
        return page(request, "workers.html", payload)

    @app.get("/audit", response_class=HTMLResponse)
    @app.get("/api/audit")
    def audit_page(request: Request, offset: int = 0, limit: int = 200) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        return page(request, "audit.html", data.audit(engine, max(1, min(limit, 1000)), max(0, offset)))

    def run_sql(q: str) -> dict[str, Any]:
        if not q.strip():
            return {"query": q, "headers": [], "rows": [], "truncated": False, "error": None}
        try:
            headers, rows, truncated = rm.readonly_query(settings.db_url, q, SQL_MAX_ROWS)
        except rm.ReadOnlyQueryError as exc:
            return {"query": q, "headers": [], "rows": [], "truncated": False, "error": str(exc)}
        return {"query": q, "headers": headers, "rows": rows, "truncated": truncated, "error": None}

    @app.get("/sql", response_class=HTMLResponse)
    @app.get("/api/sql")
    async def sql_page(request: Request, q: str = "") -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        payload = await asyncio.to_thread(run_sql, q)
        payload["views"] = ["timeline", "pending_approvals"]
        return page(request, "sql.html", payload, 400 if payload["error"] else 200)

    @app.get("/sql.csv")
    async def sql_csv(request: Request, q: str) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        payload = await asyncio.to_thread(run_sql, q)
        if payload["error"]:
            return Response(payload["error"] + "\n", status_code=400, media_type="text/plain")
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(payload["headers"])
        w.writerows(payload["rows"])
        return Response(
            out.getvalue(),
            media_type="text/csv",
            headers={"content-disposition": 'attachment; filename="jetbox-query.csv"'},
        )

    @app.get("/submit", response_class=HTMLResponse)
    def submit_form(request: Request) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        return page(request, "submit.html", {"text": "", "errors": [], "lines": []})

    @app.post("/submit")
    @app.post("/api/submit")
    async def submit(request: Request) -> Any:
        from schema.artifacts import atomic_write_bytes
        from schema.ticket import TicketInvalid, parse_ticket

        user, form = await writer_user(request)
        text = str(form.get("yaml") or "")
        if user is None:
            return refused(request, "log in first: submitting a ticket needs a console token")
        try:
            ticket = parse_ticket(text.encode(), filename=_pasted_name(text))
        except TicketInvalid as exc:
            errors = [{"line": e.line, "col": e.col, "message": e.message, "text": str(e)} for e in exc.errors]
            if wants_json(request):
                return JSONResponse({"ok": False, "errors": errors}, status_code=422)
            by_line: dict[int, list[dict[str, Any]]] = {}
            for e in errors:
                by_line.setdefault(int(str(e["line"])), []).append(e)
            lines = [{"n": n, "text": ln, "errors": by_line.get(n, [])} for n, ln in enumerate(text.splitlines(), 1)]
            # An error past the last line (a missing key at the end) still shows.
            for n in sorted(k for k in by_line if k > len(lines)):
                lines.append({"n": n, "text": "", "errors": by_line[n]})
            return page(request, "submit.html", {"text": text, "errors": errors, "lines": lines}, 422)
        dest = settings.tickets_path / f"{ticket.id}.yaml"
        await asyncio.to_thread(atomic_write_bytes, dest, text.encode())
        message = f"submitted {ticket.id} -> {dest} (by {user}); the daemon records it when it reads the folder"
        if wants_json(request):
            return JSONResponse({"ok": True, "ticket": ticket.id, "path": str(dest), "message": message})
        return RedirectResponse(f"/tickets/{ticket.id}?{urlencode({'msg': message, 'ok': 1})}", 303)

    play = gradio_playground.play

    @app.get("/playground", response_class=HTMLResponse)
    @app.get("/api/playground")
    def playground(request: Request) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        return page(request, "playground.html", play.sudoku_payload(EXAMPLE, "gpu"))

    @app.post("/playground")
    @app.post("/api/playground")
    async def playground_solve(request: Request) -> Any:
        """Solve a sudoku with the current core's reasoner on a worker, through the queue like `jbctl infer`."""
        if (r := reader_refused(request)) is not None:
            return r
        _, form = await writer_user(request)
        payload, status = await asyncio.to_thread(play.solve, form)
        return page(request, "playground.html", payload, status)

    @app.get("/playground/image", response_class=HTMLResponse)
    @app.get("/api/playground/image")
    def image_playground(request: Request) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        return page(request, "playground_image.html", play.image_payload({}))

    @app.post("/playground/image")
    @app.post("/api/playground/image")
    async def image_look(request: Request) -> Any:
        """What the core's image encoder sees in a picture, on a warm worker through the queue."""
        if (r := reader_refused(request)) is not None:
            return r
        _, form = await writer_user(request)
        payload, status = await asyncio.to_thread(play.look, form)
        return page(request, "playground_image.html", payload, status)

    # The Gradio playground: the same `Playground` calls, built on its first visit (importing gradio
    # takes seconds; a console that is never played with never pays them).
    app.mount(GRADIO_PATH, gradio_playground)

    # --- login -----------------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> Any:
        return page(
            request,
            "login.html",
            {"next": _local_path(next), "error": None, "has_tokens": bool(auth.load_tokens(settings.home))},
        )

    @app.post("/login")
    async def login(request: Request) -> Any:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        target = _local_path(form.get("next") or "/")
        user = auth.user_for_token(settings.home, form.get("token") or "")
        if user is None:
            await asyncio.sleep(0.2)  # slows guessing a little; tokens have 256 bits anyway
            return page(
                request,
                "login.html",
                {"next": target, "error": "unknown token", "has_tokens": bool(auth.load_tokens(settings.home))},
                403,
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            auth.SESSION_COOKIE,
            auth.make_session(key, user),
            max_age=auth.SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https",
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Any:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(auth.SESSION_COOKIE)
        return response

    @app.get("/api/session")
    def whoami(request: Request) -> dict[str, Any]:
        session = session_of(request)
        return {"user": session.user if session else None, "csrf": auth.csrf_token(key, session) if session else None}

    # --- live ------------------------------------------------------------------------------------

    @app.get("/events/stream")
    async def stream(request: Request, ticket: str | None = None) -> Any:
        if (r := reader_refused(request)) is not None:
            return r
        sub = broadcaster.subscribe(ticket)

        async def gen() -> Any:
            try:
                yield f"retry: 1000\nevent: hello\ndata: {json.dumps({'last_seq': broadcaster.last_seq})}\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(sub.queue.get(), timeout=15)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield ": keep-alive\n\n"
                        continue
                    yield f"id: {item['seq']}\nevent: jetbox\ndata: {json.dumps(item)}\n\n"
            finally:
                broadcaster.unsubscribe(sub)

        return StreamingResponse(
            gen(), media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
        )

    return app


def _pasted_name(text: str) -> str:
    """The file name a pasted ticket would have (`<id>.yaml`), so its errors read as `jbctl validate` prints them."""
    import re

    found = re.search(r"^id:\s*['\"]?([A-Za-z0-9_.-]+)", text, re.M)
    return f"{found.group(1)}.yaml" if found else "ticket.yaml"


def _local_path(target: str) -> str:
    """Only same-site paths after login (an open redirect would help phishing)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _when(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")
