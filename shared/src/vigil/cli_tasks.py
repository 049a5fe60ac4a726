"""The task commands of ``vigil``: submit, status, list, logs, wait, cancel.

Each talks to the gateway through :class:`vigil.client.Client`; exit codes are in
:mod:`vigil.cli_output` and listed in ``vigil --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from vigil.api import TaskList, TaskSummary
from vigil.cli_config import add_client_flags, open_client
from vigil.cli_output import (
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_TASK_FAILED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    STATUS_COLORS,
    Printer,
    StatusLine,
    age,
    error_text,
    exit_code,
    exit_epilog,
    labels_text,
    out_json,
    status_text,
    table,
    terminal_width,
    wants_color,
)
from vigil.client import Client, GatewayError, WaitTimeout
from vigil.errors import ApiError, VigilError
from vigil.messages import STATUSES, TERMINAL, TaskState

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]

STATUS_ALIASES = {
    "active": ("queued", "scheduled", "running"),
    "finished": tuple(s for s in STATUSES if s in TERMINAL),
}
PAGE_MAX = 500
POLL_S = 1.0  # how often a status line asks the gateway how the task is doing


# parsing helpers ----------------------------------------------------------------------------
def pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VigilError(f"{flag} takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def statuses(values: list[str] | None) -> list[str]:
    """``--status`` values, repeated and/or comma-separated, aliases expanded, checked."""
    out: list[str] = []
    for value in values or []:
        for item in filter(None, (v.strip() for v in value.split(","))):
            expanded = STATUS_ALIASES.get(item, (item,))
            for status in expanded:
                if status not in STATUSES:
                    raise VigilError(
                        f"--status {item!r} is not a status; use one of "
                        f"{', '.join(STATUSES)} (or active, finished)")
                if status not in out:
                    out.append(status)
    return out


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


def parse_time(value: str, flag: str, now: datetime | None = None) -> datetime:
    """A duration ago (``90s``, ``15m``, ``1h30m``, ``7d``, ``2w``) or an RFC 3339 time
    (``2024-05-01T12:00:00Z``; a time without a zone is local time)."""
    text = value.strip()
    if text and _DURATION.sub("", text) == "":
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise VigilError(f"{flag} takes a duration ago such as 30m, 2h, 7d, or an RFC 3339 "
                         f"time such as 2024-05-01T12:00:00Z, not {value!r}") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as a human typing a date means it
    return when.astimezone(UTC)


def load_task_file(name: str) -> dict[str, Any]:
    """A task spec from a YAML or JSON file (``-`` is stdin): a mapping of task fields."""
    label = "stdin" if name == "-" else name
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise VigilError(f"cannot read task file {label}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise VigilError(f"task file {label} is not UTF-8 text") from None
    try:
        # YAML is (nearly) a superset of JSON, so any other name may hold either.
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise VigilError(f"task file {label} is not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        raise VigilError(f"task file {label} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        found = "nothing" if data is None else f"a {type(data).__name__}"
        raise VigilError(f"task file {label} must hold a mapping of task fields, e.g. "
                         f"`command: [python3, agent.py]`; it holds {found}")
    return _stringify(data, label)


def _stringify(spec: dict[str, Any], label: str) -> dict[str, Any]:
    """YAML reads ``DEBUG: 1`` as a number and ``FLAG: yes`` as a boolean; the spec wants
    strings in ``command``, ``env`` and ``labels``. Integers are turned back into text;
    anything else would be a guess (was it ``yes`` or ``true``?), so it is an error."""
    def fix(value: Any, where: str) -> Any:
        if isinstance(value, bool) or value is None or isinstance(value, float):
            raise VigilError(f"task file {label}: {where} is {value!r}, not text; put it in "
                             "quotes")
        return str(value) if isinstance(value, int) else value

    out = dict(spec)
    if isinstance(out.get("command"), list):
        out["command"] = [fix(v, f"command[{i}]") for i, v in enumerate(out["command"])]
    for key in ("env", "labels", "secrets"):
        if isinstance(out.get(key), dict):
            out[key] = {str(k): fix(v, f"{key}.{k}") for k, v in out[key].items()}
    return out


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The task spec: the file's fields (``-f``), then flags over them."""
    spec: dict[str, Any] = load_task_file(args.file) if args.file else {}
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if command:
        spec["command"] = command
    if "command" not in spec:
        raise VigilError("no command: give one after `--` (e.g. vigil submit -- python3 -c "
                         "'print(1)') or in a task file with -f")
    for key, value in (("image", args.image), ("id", args.id), ("pool", args.pool),
                       ("timeout_s", args.timeout), ("max_attempts", args.max_attempts)):
        if value is not None:
            spec[key] = value
    if args.env:
        spec["env"] = {**spec.get("env", {}), **pairs(args.env, "--env")}
    if args.label:
        spec["labels"] = {**spec.get("labels", {}), **pairs(args.label, "--label")}
    if args.secret:
        spec["secrets"] = {**spec.get("secrets", {}), **pairs(args.secret, "--secret")}
    if args.egress:
        egress = dict(spec.get("egress") or {})
        allow = list(egress.get("allow", []))
        allow += [host for host in args.egress if host not in allow]
        spec["egress"] = {**egress, "allow": allow}
    if args.environment:
        spec["environment"] = args.environment
    if args.node_label:
        spec["node_labels"] = {**spec.get("node_labels", {}),
                               **pairs(args.node_label, "--node-label")}
    if args.priority is not None:
        spec["priority"] = args.priority
    if args.queue_timeout is not None:
        spec["queue_timeout_s"] = args.queue_timeout
    if args.not_before:
        spec["not_before"] = _not_before(args.not_before).isoformat()
    if args.no_retry_on:
        retry = dict(spec.get("retry") or {})
        retry["non_retryable_exit_codes"] = sorted(
            {*retry.get("non_retryable_exit_codes", []), *args.no_retry_on})
        spec["retry"] = retry
    return spec


def _not_before(value: str) -> datetime:
    """An absolute time, or a delay from now (``10m`` = ten minutes from now)."""
    now = datetime.now(UTC)
    when = parse_time(value, "--not-before", now)
    if value.strip() and _DURATION.sub("", value.strip()) == "":
        return now + (now - when)  # parse_time reads durations as "ago"
    return when


# following a task ---------------------------------------------------------------------------
async def follow_events(client: Client, task_id: str, printer: Printer) -> TaskState:
    async for ev in client.events(task_id):
        printer.event(ev)
    return await client.get(task_id)


class Watch:
    """Keeps a :class:`StatusLine` current by asking the gateway about the task every
    second, while the command does its real work (following logs, waiting)."""

    def __init__(self, client: Client, task_id: str, line: StatusLine) -> None:
        self.client = client
        self.task_id = task_id
        self.line = line
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        if self.line.enabled:
            self.line.describe(self.task_id, None)
            self.line.start()
            self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        await self.line.stop()

    async def _poll(self) -> None:
        while True:
            try:
                state: TaskState | None = await self.client.get(self.task_id)
            except Exception:  # decoration only: the command itself reports errors
                state = None
            self.line.describe(self.task_id, state)
            await asyncio.sleep(POLL_S)


def _outcome_code(state: TaskState) -> int:
    return EXIT_OK if state.status == "succeeded" else EXIT_TASK_FAILED


# commands -----------------------------------------------------------------------------------
async def cmd_submit(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    async with open_client(args) as client:
        try:
            accepted = await client.submit(spec, idempotency_key=args.idempotency_key)
        except ApiError as exc:
            if exit_code(exc) != EXIT_USAGE or exc.status in (401, 403):
                raise  # not about this task: main() says what to do
            where = f" from {args.file}" if args.file else ""
            print(f"vigil: submission{where} refused: {error_text(exc)}", file=sys.stderr)
            return exit_code(exc)
        task_id = accepted["id"]
        if args.json and not args.wait:
            print(json.dumps(accepted))
            return EXIT_OK
        if not args.json:
            print(f"submitted task {task_id} ({accepted.get('status') or 'pending'})")
        if not args.wait:
            print(f"  follow it: vigil logs -f {task_id}   (or vigil submit --wait next time)")
            return EXIT_OK
        printer = Printer(sys.stderr if args.json else sys.stdout)
        state = await follow_events(client, task_id, printer)
        if args.json:
            print(out_json(state))
        else:
            printer.outcome(state)
        return _outcome_code(state)


async def cmd_status(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        state = await client.get(args.task_id)
        confessions = await client.confessions(args.task_id)
    if args.json:
        print(out_json(state))
        return EXIT_OK
    color = wants_color(sys.stdout)
    rows: list[tuple[str, object]] = [
        ("id", state.id), ("tenant", state.tenant),
        ("status", status_text(state.status, color)),
        ("attempt", state.attempt), ("executor", state.executor or "-"),
        ("exit code", "-" if state.exit_code is None else state.exit_code),
        ("error", state.error or "-"), ("created", _when(state.created_at)),
        ("started", _when(state.started_at)), ("finished", _when(state.finished_at)),
    ]
    if state.spec is not None:
        rows.insert(3, ("command", " ".join(state.spec.command)))
        rows.insert(4, ("image", state.spec.image or "-"))
        if state.spec.labels:
            rows.insert(5, ("labels", labels_text(state.spec.labels)))
    if state.spec is not None and state.spec.pool != "default":
        rows.insert(4, ("pool", state.spec.pool))
    if state.waiting:
        rows.append(("waiting", state.waiting))
    if state.retry_at and state.status == "scheduled":
        rows.append(("retry at", _when(state.retry_at)))
    if state.rejected_by:
        rows.append(("rejected", f"over the tenant's {state.rejected_by} limit"))
    if state.cancel_requested_at:
        reason = f" ({state.cancel_reason})" if state.cancel_reason else ""
        rows.append(("cancel", f"requested {_when(state.cancel_requested_at)}{reason}"))
    for key, value in rows:
        print(f"{key:>10}  {value}")
    for c in confessions:
        print(f"{'confessed':>10}  [{c.get('severity')}] {c.get('source')}: {c.get('summary')}")
    return EXIT_OK


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z ({age(moment)} ago)"


async def cmd_list(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise VigilError("--limit takes a number of tasks, at least 1")
    filters: dict[str, Any] = {
        "status": statuses(args.status) or None,
        "labels": pairs(args.label, "--label") or None,
        "created_after": parse_time(args.since, "--since") if args.since else None,
        "created_before": parse_time(args.until, "--until") if args.until else None,
    }
    wanted = None if args.all else (args.limit or 50)
    async with open_client(args) as client:
        tasks, cursor = await _collect(client, filters, wanted, args.cursor,
                                       page=args.limit if args.all else None)
    if args.json:
        print(out_json(TaskList(tasks=tasks, next_cursor=cursor)))
        return EXIT_OK
    if not tasks:
        print("no tasks" + (" match" if any(filters.values()) else " yet"),
              file=sys.stderr)
        return EXIT_OK
    for line in render_tasks(tasks, color=wants_color(sys.stdout),
                             width=terminal_width(sys.stdout)):
        print(line)
    if cursor:
        print(f"(first {len(tasks)}; more with --limit N, --all, or --cursor {cursor})",
              file=sys.stderr)
    return EXIT_OK


async def _collect(client: Client, filters: dict[str, Any], wanted: int | None,
                   cursor: str | None, page: int | None) -> tuple[list[TaskSummary], str | None]:
    """Up to ``wanted`` tasks (all if None), page by page; and the cursor after them."""
    tasks: list[TaskSummary] = []
    while True:
        size = min(PAGE_MAX, (page or PAGE_MAX) if wanted is None else wanted - len(tasks))
        got = await client.list_tasks(**filters, limit=size, cursor=cursor)
        tasks.extend(got.tasks)
        cursor = got.next_cursor
        if not cursor or not got.tasks or (wanted is not None and len(tasks) >= wanted):
            return tasks, cursor


def render_tasks(tasks: list[TaskSummary], *, color: bool = False, width: int | None = None,
                 now: datetime | None = None) -> list[str]:
    """The ``vigil list`` table."""
    headers = ("ID", "STATUS", "ATTEMPT", "EXECUTOR", "AGE", "EXIT", "LABELS")
    rows, colors = [], []
    for t in tasks:
        rows.append((t.id, t.status, str(t.attempt), t.executor or "-", age(t.created_at, now),
                     "-" if t.exit_code is None else str(t.exit_code), labels_text(t.labels)))
        colors.append(("", STATUS_COLORS.get(t.status, ""), "", "", "", "", "2"))
    return table(headers, rows, colors=colors, color=color, width=width,
                 right=frozenset({2, 4, 5}))


async def cmd_logs(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        if not args.follow:
            async for line in client.logs(args.task_id, stream=args.stream):
                print(line)
            return EXIT_OK
        status = StatusLine(enabled=None if not args.quiet else False)
        async with Watch(client, args.task_id, status):
            async for line in client.logs(args.task_id, follow=True, stream=args.stream):
                status.print_line(line)
        state = await client.get(args.task_id)
    if status.enabled:
        Printer(sys.stderr).outcome(state)
    return _outcome_code(state)


async def _wait(client: Client, task_id: str, timeout_s: float | None,
                quiet: bool) -> TaskState:
    status = StatusLine(enabled=False if quiet else None)
    async with Watch(client, task_id, status):
        return await client.wait(task_id, timeout_s=timeout_s)


async def cmd_wait(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        try:
            state = await _wait(client, args.task_id, args.timeout, args.quiet or args.json)
        except WaitTimeout as exc:
            print(f"vigil: {exc}", file=sys.stderr)
            if args.json and exc.state is not None:
                print(out_json(exc.state))
            return exit_code(exc)
    if args.json:
        print(out_json(state))
    else:
        Printer().outcome(state)
    return _outcome_code(state)


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        try:
            answer = await client.cancel(args.task_id, reason=args.reason)
        except GatewayError as exc:
            if exc.code != "finished":  # 409: the task ended before it could be cancelled
                raise
            state = await client.get(args.task_id)
            print(f"vigil: task {args.task_id} already {state.status}; nothing to cancel",
                  file=sys.stderr)
            if args.json:
                print(out_json(state))
            return EXIT_TASK_FAILED
        if not args.wait:
            if args.json:
                print(out_json(answer))
            elif answer.status == "cancelled":
                print(f"task {answer.id} cancelled")
            else:
                print(f"cancel requested: task {answer.id} is {answer.status}; its executor "
                      f"is stopping it (see it end: vigil wait {answer.id})")
            return EXIT_OK
        try:
            state = await _wait(client, args.task_id, args.timeout, args.json)
        except WaitTimeout as exc:
            print(f"vigil: {exc}", file=sys.stderr)
            if args.json and exc.state is not None:
                print(out_json(exc.state))
            return exit_code(exc)
    if args.json:
        print(out_json(state))
    else:
        Printer().outcome(state, expected="cancelled")
    return EXIT_OK if state.status == "cancelled" else EXIT_TASK_FAILED


# parser -------------------------------------------------------------------------------------
def _parser(sub: argparse._SubParsersAction, name: str,  # type: ignore[type-arg]
            help: str, description: str, epilog: str, func: Command) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add submit, status, list, logs, wait and cancel to the ``vigil`` parser."""
    sm = _parser(sub, "submit", "submit a task (optionally wait, printing its output)",
                 "Submit a task to the gateway: a command, and optionally its image, env,\n"
                 "labels and limits, from flags or a YAML/JSON task file (flags win).",
                 """examples:
  vigil submit -- python3 -c 'print("hello")'
  vigil submit --wait --env DEMO_STEPS=3 --label team=ml -- python3 /opt/vigil/demo_agent.py
  vigil submit -f task.yaml --label run=42
  vigil submit --secret ANTHROPIC_API_KEY=llm-key -- python3 agent.py

a task file (YAML or JSON; `-f -` reads stdin):
  command: [python3, /opt/vigil/demo_agent.py]
  env: {DEMO_STEPS: "3"}
  secrets: {ANTHROPIC_API_KEY: llm-key}     (the tenant's secrets, by name)
  labels: {team: ml}
  timeout_s: 600
  max_attempts: 3

""" + exit_epilog(
        (EXIT_OK, "submitted (with --wait: the task succeeded)"),
        (EXIT_TASK_FAILED, "with --wait: the task ended otherwise"),
        (EXIT_USAGE, "the task was refused (the message names the field)"),
        (EXIT_RATE_LIMITED, "over the tenant's quota or rate limited: retry later")),
        cmd_submit)
    sm.add_argument("command", nargs=argparse.REMAINDER,
                    help="the command and its arguments, after --")
    sm.add_argument("-f", "--file", metavar="FILE",
                    help="task spec as YAML or JSON (`-` for stdin); flags override its fields")
    sm.add_argument("--image", help="container image (default: the platform's agent image)")
    sm.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment (repeat)")
    sm.add_argument("--secret", action="append", metavar="ENV=SECRET",
                    help="give the agent the tenant's secret SECRET as $ENV and "
                    "/run/secrets/ENV (repeat; see `vigil secret`)")
    sm.add_argument("--egress", action="append", metavar="HOST[:PORT]",
                    help="let the agent reach HOST (or *.DOMAIN) through the executor's "
                    "proxy; without a port 80 and 443 (repeat; default: no network)")
    sm.add_argument("--environment", metavar="NAME",
                    help="run in the persistent environment NAME: start from its workspace, "
                    "commit back on success (see `vigil env`)")
    sm.add_argument("--label", action="append", metavar="KEY=VALUE", help="label (repeat)")
    sm.add_argument("--timeout", type=float, metavar="SECONDS", help="wall-clock limit")
    sm.add_argument("--max-attempts", type=int, metavar="N",
                    help="attempts the agent gets; failures retry with backoff (default 3)")
    sm.add_argument("--no-retry-on", type=int, action="append", metavar="CODE",
                    help="an exit code that ends the task without retrying (repeat)")
    sm.add_argument("--id", help="task id (default: assigned)")
    sm.add_argument("--pool", help="executor pool (default: default)")
    sm.add_argument("--node-label", action="append", metavar="KEY=VALUE",
                    help="a label the executor must advertise (repeat)")
    sm.add_argument("--priority", type=int, metavar="0-9",
                    help="higher starts first among your queued tasks (default 5)")
    sm.add_argument("--not-before", metavar="TIME",
                    help="do not start before: RFC 3339, or a delay such as 10m or 2h")
    sm.add_argument("--queue-timeout", type=float, metavar="SECONDS",
                    help="give up (timed_out) if not started within this long")
    sm.add_argument("--idempotency-key", metavar="KEY",
                    help="submitting again with the same key returns the same task")
    sm.add_argument("-w", "--wait", action="store_true",
                    help="follow the task's output until it ends; exit 0 only on success")
    sm.add_argument("--json", action="store_true",
                    help="print the gateway's answer (with --wait: the final state) as JSON")
    add_client_flags(sm)

    st = _parser(sub, "status", "show a task's state and confessions",
                 "Show a task's state (status, attempt, executor, exit code, error, times)\n"
                 "and the confessions on its timeline.",
                 "examples:\n  vigil status t_01HZ…\n  vigil status t_01HZ… --json | jq "
                 ".status\n\n" + exit_epilog((EXIT_OK, "shown"),
                                               (EXIT_TASK_FAILED, "no such task")), cmd_status)
    st.add_argument("task_id", metavar="TASK_ID")
    st.add_argument("--json", action="store_true", help="print the raw state as JSON")
    add_client_flags(st)

    ls = _parser(sub, "list", "list tasks, newest first, with filters",
                 "List tasks, newest first: ID, STATUS, ATTEMPT, EXECUTOR, AGE, EXIT, LABELS.",
                 f"""examples:
  vigil list
  vigil list --status failed,dead --since 1h
  vigil list --status active --label team=ml --limit 200
  vigil list --all --json | jq -r '.tasks[].id'

statuses: {', '.join(STATUSES)};
  active = queued,scheduled,running; finished = the five final ones.
--json prints one JSON document, the API's own shape: {{"tasks": [...], "next_cursor": ...}};
  pass next_cursor back with --cursor for the next page.

""" + exit_epilog((EXIT_OK, "listed (also when none match)")), cmd_list)
    ls.add_argument("--status", action="append", metavar="S[,S…]",
                    help="only these statuses (repeat or comma-separate)")
    ls.add_argument("--label", action="append", metavar="KEY=VALUE",
                    help="only tasks with this label (repeat: all must match)")
    ls.add_argument("--since", metavar="WHEN",
                    help="created after: a duration ago (30m, 2h, 7d) or RFC 3339")
    ls.add_argument("--until", metavar="WHEN", help="created before (same forms as --since)")
    ls.add_argument("--limit", type=int, metavar="N",
                    help="at most N tasks (default 50); with --all, the page size")
    ls.add_argument("--all", action="store_true", help="every matching task (all pages)")
    ls.add_argument("--cursor", metavar="C", help="continue after a previous page")
    ls.add_argument("--json", action="store_true", help="print JSON (see below)")
    add_client_flags(ls)

    lg = _parser(sub, "logs", "print a task's output (-f: follow it until it ends)",
                 "Print a task's output lines (stdout and stderr, in order) as they were\n"
                 "recorded. With -f, keep printing new lines until the task finishes; on a\n"
                 "terminal a status line on stderr shows its status and attempt meanwhile.",
                 """examples:
  vigil logs t_01HZ…
  vigil logs -f t_01HZ…
  vigil logs t_01HZ… --stream stderr | tail -20

No --json: the lines are the task's own output, printed as they were.

""" + exit_epilog((EXIT_OK, "printed (with -f: the task succeeded)"),
                  (EXIT_TASK_FAILED, "with -f the task ended otherwise, or no such task")),
        cmd_logs)
    lg.add_argument("task_id", metavar="TASK_ID")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing until the task ends; exit 0 only on success")
    lg.add_argument("--stream", choices=("stdout", "stderr"), help="only this stream")
    lg.add_argument("-q", "--quiet", action="store_true", help="no status line on stderr")
    add_client_flags(lg)

    wt = _parser(sub, "wait", "wait for a task to finish; exit status says how it ended",
                 "Wait until a task reaches a final status, then print it. On a terminal a\n"
                 "status line on stderr shows its progress meanwhile.",
                 """examples:
  vigil wait t_01HZ…
  vigil wait t_01HZ… --timeout 600 --json

""" + exit_epilog((EXIT_OK, "succeeded"),
                  (EXIT_TASK_FAILED, "failed, cancelled, timed_out or dead (or no such task)"),
                  (EXIT_TIMEOUT, "--timeout ran out (the task goes on; as timeout(1))")),
        cmd_wait)
    wt.add_argument("task_id", metavar="TASK_ID")
    wt.add_argument("--timeout", type=float, metavar="SECONDS",
                    help=f"give up after this long (exit {EXIT_TIMEOUT})")
    wt.add_argument("--json", action="store_true", help="print the final state as JSON")
    wt.add_argument("-q", "--quiet", action="store_true", help="no status line on stderr")
    add_client_flags(wt)

    cn = _parser(sub, "cancel", "cancel a task (a running one is stopped)",
                 "Cancel a task. A queued task ends cancelled at once; a running one is\n"
                 "stopped by its executor (SIGTERM, a grace period, then SIGKILL) and then\n"
                 "ends cancelled. Cancelling a cancelled task again is harmless.",
                 """examples:
  vigil cancel t_01HZ…
  vigil cancel t_01HZ… --reason "wrong dataset" --wait

""" + exit_epilog((EXIT_OK, "cancel accepted (with --wait: the task ended cancelled)"),
                  (EXIT_TASK_FAILED, "the task had already finished, ended otherwise, or "
                   "does not exist"),
                  (EXIT_TIMEOUT, "--wait --timeout ran out")), cmd_cancel)
    cn.add_argument("task_id", metavar="TASK_ID")
    cn.add_argument("--reason", help="why (recorded on the task, at most 500 characters)")
    cn.add_argument("-w", "--wait", action="store_true", help="wait until the task has ended")
    cn.add_argument("--timeout", type=float, metavar="SECONDS",
                    help=f"with --wait: give up after this long (exit {EXIT_TIMEOUT})")
    cn.add_argument("--json", action="store_true", help="print the answer (or final state) as "
                    "JSON")
    add_client_flags(cn)

