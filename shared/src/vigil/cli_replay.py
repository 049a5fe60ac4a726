"""``vigil replay``: operator tools that talk to NATS directly.

``timeline`` prints a task's history across streams; ``stream`` prints a stream range as
JSON lines or re-publishes it to a subject; ``redrive`` runs finished tasks again;
``rebuild`` folds the event log into task states and compares them with ``vigil-tasks``.
Whatever writes is a dry run until ``--yes``. The logic lives in :mod:`vigil.replay`,
:mod:`vigil.timeline`, :mod:`vigil.redrive` and :mod:`vigil.rebuild`; this module is the
argument parsing and the printing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TextIO

import structlog
from nats.js import JetStreamContext

from vigil import migrate, rebuild, redrive, replay, timeline
from vigil.cli_config import environ
from vigil.cli_output import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, exit_epilog, out_json
from vigil.cli_tasks import pairs
from vigil.errors import VigilError
from vigil.jetstream import tenants_of
from vigil.progress import ProgressBar

EXIT_DIFFERS = 1  # differs, not found, not all succeeded

Impl = Callable[[argparse.Namespace, TextIO, TextIO], Awaitable[int]]

CONNECTION = """\
connection (first found wins):
  --nats-url URL      e.g. nats://operator:PASSWORD@host:4222
  VIGIL_NATS_URL
  DIR/client.json     nats_operator_url, written by `vigil up` (--data-dir DIR,
                      $VIGIL_DATA_DIR, default .vigil)"""


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(out_json(obj) + "\n")


def _time(when: datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M:%S.") + \
        f"{when.microsecond // 1000:03d}"


@contextlib.asynccontextmanager
async def _nats(args: argparse.Namespace) -> AsyncIterator[JetStreamContext]:
    url = replay.operator_url(args.nats_url, args.data_dir, environ())
    nc = await replay.operator_connect(url)
    try:
        yield nc.jetstream(timeout=5.0)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _entry(impl: Impl) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """What ``vigil`` calls: quiet library logs (stdout may be JSON lines), then run."""

    async def run(args: argparse.Namespace) -> int:
        if not structlog.is_configured():
            from vigil import logs

            # Errors only: a reconnect warning every half second would bury the answer.
            logs.setup("vigil-replay", level="error", fmt="console")
        return await impl(args, sys.stdout, sys.stderr)

    return run


# timeline -----------------------------------------------------------------------------------
async def cmd_timeline(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with _nats(args) as js:
        tenant = args.tenant
        if tenant is None:
            # Ids are per tenant: find which tenant(s) have this one.
            found = await tenants_of(js, args.task_id)
            if len(found) > 1:
                err.write(f"vigil: task id {args.task_id!r} exists in tenants "
                          f"{', '.join(found)}; choose one with --tenant\n")
                return EXIT_USAGE
            tenant = found[0] if found else None
        if tenant is None:
            err.write(f"vigil: no task {args.task_id!r} in vigil-tasks (wrong id, or it "
                      "expired); if its events are still kept, name its tenant with "
                      "--tenant\n")
            return EXIT_DIFFERS
        tl = await timeline.build(js, args.task_id, tenant=tenant, logs=not args.no_logs,
                                  issues=args.issues)
    if not tl.found:
        err.write(f"vigil: no task {args.task_id!r}: not in vigil-tasks and no events in "
                  "VIGIL_EVENTS (wrong id, or its history aged out)\n")
        return EXIT_DIFFERS
    if args.json:
        for e in tl.entries:
            _print_json(e.to_json(), out)
        if tl.state is not None:
            _print_json({"stream": "KV_vigil-tasks", "revision": tl.revision,
                         "kind": "state", "data": tl.state}, out)
        return EXIT_OK
    out.write(f"{'TIME (UTC)':<23}  {'STREAM':<8} {'SEQ':>7}  {'KIND':<11} SUMMARY\n")
    for e in tl.entries:
        short = e.stream.removeprefix("VIGIL_").lower()
        out.write(f"{_time(e.time):<23}  {short:<8} {e.seq:>7}  {e.kind:<11} {e.summary}\n")
    s = tl.state
    if s is None:
        out.write("now: not in vigil-tasks (expired, or never recorded)\n")
    else:
        code = f", exit {s.exit_code}" if s.exit_code is not None else ""
        on = f" on {s.executor}" if s.executor else ""
        out.write(f"now: {s.status}, attempt {s.attempt}{on}{code}  "
                  f"(vigil-tasks revision {tl.revision})\n")
        if s.error:
            out.write(f"     error: {s.error}\n")
    return EXIT_OK


# stream -----------------------------------------------------------------------------------
def _window(args: argparse.Namespace) -> replay.Window:
    if args.from_seq and args.to_seq and args.to_seq < args.from_seq:
        raise VigilError(f"--to-seq {args.to_seq} is before --from-seq {args.from_seq}")
    return replay.Window(
        subject=args.subject, from_seq=args.from_seq or 0, to_seq=args.to_seq or 0,
        since=replay.parse_time(args.since) if args.since else None,
        until=replay.parse_time(args.until) if args.until else None)


def _window_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"subject": args.subject, "from_seq": args.from_seq, "to_seq": args.to_seq,
            "since": args.since, "until": args.until}


def _record(m: replay.StoredMsg) -> dict[str, Any]:
    return {"stream": m.stream, "seq": m.seq, "subject": m.subject, "time": m.time,
            "headers": m.headers, "data": timeline.decode(m.data)}


async def cmd_stream(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    stream = replay.stream_name(args.stream)
    window = _window(args)
    async with _nats(args) as js:
        if args.to:
            return await _republish(js, args, stream, window, out, err)
        reader = replay.RangeReader(js, stream, window)
        total = await reader.open()
        # The bar would garble a terminal that also shows the JSON lines.
        bar = ProgressBar(f"read {stream}", total, err) if not out.isatty() else None
        first = last = None
        count = 0
        async for m in reader:
            _print_json(_record(m), out)
            first, last, count = first or m, m, count + 1
            if bar is not None:
                bar.advance()
            if args.limit and count >= args.limit:
                await reader.close()
                break
        if bar is not None:
            bar.close()
    where = f" {window.subject}" if window.subject else ""
    span = f" (seq {first.seq}..{last.seq}, {_time(first.time)} .. {_time(last.time)})" \
        if first and last else ""
    err.write(f"{count} messages from {stream}{where}{span}\n")
    return EXIT_OK


async def _republish(js: JetStreamContext, args: argparse.Namespace, stream: str,
                     window: replay.Window, out: TextIO, err: TextIO) -> int:
    replay_id = args.replay_id or replay.replay_id_for(stream, _window_args(args), args.to)
    plan = await replay.plan_replay(js, stream, window, args.to, replay_id, limit=args.limit)
    if args.json and not args.yes:
        _print_json({"replay_id": plan.replay_id, "stream": stream, "filter": window.subject,
                     "target": plan.target, "target_stream": plan.target_stream,
                     "count": plan.count, "done_until": plan.done_until,
                     "first_seq": plan.first.seq if plan.first else None,
                     "last_seq": plan.last.seq if plan.last else None,
                     "first_time": plan.first.time if plan.first else None,
                     "last_time": plan.last.time if plan.last else None,
                     "dry_run": True}, out)
        return EXIT_OK
    out.write(f"replay {plan.replay_id}: {stream} {window.subject or '(all subjects)'} -> "
              f"{plan.target} (stream {plan.target_stream})\n")
    if plan.done_until:
        out.write(f"  earlier runs of this replay re-published up to seq {plan.done_until}\n")
    if plan.count == 0:
        out.write("  nothing (left) to publish\n" if not args.yes else
                  "published 0 messages: nothing (left) to publish\n")
        return EXIT_OK
    assert plan.first is not None and plan.last is not None
    eta = f", about {plan.count / args.rate:.0f}s at {args.rate:g}/s" \
        if args.rate > 0 and plan.count >= args.rate else ""
    verb = "publishing" if args.yes else "would publish"
    out.write(f"  {verb} {plan.count} messages: seq {plan.first.seq} ({_time(plan.first.time)})"
              f" .. seq {plan.last.seq} ({_time(plan.last.time)}){eta}\n")
    if not args.yes:
        out.write("dry run: nothing published. Add --yes to publish (the same command resumes "
                  "and never publishes a message twice).\n")
        return EXIT_OK
    out.flush()
    result = await replay.run_replay(js, plan, rate=args.rate, err=err)
    out.write(f"published {result.published} messages (up to seq {result.last_seq}); "
              f"{result.duplicates} were already in {plan.target_stream}\n")
    if args.json:
        _print_json({"replay_id": plan.replay_id, "published": result.published,
                     "duplicates": result.duplicates, "last_seq": result.last_seq}, out)
    return EXIT_OK


# redrive -----------------------------------------------------------------------------------
async def cmd_redrive(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    sel = redrive.Selection(
        ids=tuple(args.task_ids), statuses=tuple(args.status or ()), tenant=args.tenant,
        labels=pairs(args.label, "--label"),
        since=replay.parse_time(args.since) if args.since else None)
    async with _nats(args) as js:
        chosen = redrive.choose(await redrive.load_states(js), sel)
        for task_id, why in chosen.refused.items():
            err.write(f"vigil: not redriving {task_id}: {why}\n")
        tasks = chosen.tasks
        if args.json and not args.yes:
            _print_json([{"id": c.state.id, "tenant": c.state.tenant, "status": c.state.status,
                          "attempt": c.state.attempt, "revision": c.revision,
                          "finished_at": c.state.finished_at, "error": c.state.error}
                         for c in tasks], out)
            return EXIT_OK
        if not tasks:
            out.write("no tasks to redrive (by default: dead ones; see --status)\n")
            return EXIT_DIFFERS if chosen.refused else EXIT_OK
        out.write(f"{'TASK':<28} {'TENANT':<12} {'STATUS':<10} {'ATT':>3}  {'FINISHED':<23} "
                  "ERROR\n")
        for c in tasks:
            s = c.state
            out.write(f"{s.id:<28} {s.tenant:<12} {s.status:<10} {s.attempt:>3}  "
                      f"{_time(s.finished_at):<23} {(s.error or '-')[:60]}\n")
        if not args.yes:
            out.write(f"dry run: would redrive {len(tasks)} task(s) as new attempts. Add --yes "
                      "to send the requests.\n")
            return EXIT_OK
        out.flush()
        sent = await redrive.send(js, tasks, reason=args.reason, rate=args.rate, err=err)
        again = f" ({sent.duplicates} had been sent already)" if sent.duplicates else ""
        out.write(f"sent {sent.published} redrive request(s){again}; the scheduler runs each "
                  "task again if it is still as listed\n")
        if not args.wait:
            out.write("  follow one: vigil replay timeline TASK_ID\n")
            return EXIT_OK
        out.flush()
        outcomes = await redrive.wait_for(js, tasks, args.timeout)
    failed = 0
    for key, state in outcomes.items():
        task_id = key.partition(".")[2]  # <tenant>.<id>
        if state is None:
            failed += 1
            out.write(f"{task_id}: did not finish within {args.timeout:g}s\n")
        else:
            failed += state.status != "succeeded"
            out.write(f"{task_id}: {state.status} (attempt {state.attempt})\n")
    return EXIT_DIFFERS if failed else EXIT_OK


# migrate-keys ------------------------------------------------------------------------------
async def cmd_migrate_keys(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with _nats(args) as js:
        found = await migrate.plan(js)
        for key, why in found.skipped.items():
            err.write(f"vigil: not moving {key!r}: {why}\n")
        if args.json:
            return await _migrate_json(js, args, found, out, err)
        if not found.moves:
            out.write("nothing to move: every key of vigil-tasks has the <tenant>.<id> layout\n")
            return EXIT_OK
        for m in found.moves[:args.show]:
            out.write(f"  {m.key}  ->  {m.new_key}  ({m.state.status})\n")
        if len(found.moves) > args.show:
            out.write(f"  ... and {len(found.moves) - args.show} more\n")
        if not args.yes:
            out.write(f"dry run: would move {len(found.moves)} task key(s) to the per-tenant "
                      "layout. Add --yes to move them.\n")
            return EXIT_OK
        out.flush()
        result = await migrate.run(js, found.moves, rate=args.rate, err=err)
    out.write(f"moved {result.moved} key(s)"
              + (f"; {result.already} had been moved by an earlier run" if result.already
                 else "") + "\n")
    if result.changed:
        out.write(f"{len(result.changed)} key(s) changed while moving and were left: "
                  f"{', '.join(result.changed[:10])}; run the command again\n")
        return EXIT_DIFFERS
    return EXIT_OK


async def _migrate_json(js: JetStreamContext, args: argparse.Namespace, found: migrate.Plan,
                        out: TextIO, err: TextIO) -> int:
    """``migrate-keys --json``: the plan (a dry run), or what was moved, as one document."""
    if not args.yes:
        _print_json({"dry_run": True, "skipped": found.skipped,
                     "moves": [{"key": m.key, "new_key": m.new_key, "status": m.state.status}
                               for m in found.moves]}, out)
        return EXIT_OK
    result = (await migrate.run(js, found.moves, rate=args.rate, err=err) if found.moves
              else migrate.Result())
    _print_json({"dry_run": False, "skipped": found.skipped, "moved": result.moved,
                 "already": result.already, "changed": result.changed}, out)
    return EXIT_DIFFERS if result.changed else EXIT_OK


# rebuild -----------------------------------------------------------------------------------
def _value(v: Any) -> str:
    text = v.isoformat() if isinstance(v, datetime) else out_json(v)
    return text if len(text) <= 60 else text[:59] + "…"


def _print_diff(d: rebuild.Diff, out: TextIO, show: int) -> None:
    out.write(f"  equal: {d.equal}   differing: {len(d.mismatched)}   only live: "
              f"{len(d.only_live)}   only rebuilt: {len(d.only_rebuilt)}")
    out.write(f"   aged out: {len(d.aged_out)}\n" if d.aged_out else "\n")
    for task_id, fields in list(d.mismatched.items())[:show]:
        for f in fields:
            out.write(f"  ≠ {task_id}  {f.field}: live {_value(f.live)}  rebuilt "
                      f"{_value(f.rebuilt)}\n")
    for label, ids in (("only live", d.only_live), ("only rebuilt", d.only_rebuilt)):
        if ids:
            more = f" (+{len(ids) - show} more)" if len(ids) > show else ""
            out.write(f"  {label}: {', '.join(ids[:show])}{more}\n")


async def cmd_rebuild(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with _nats(args) as js:
        run = rebuild.RebuildRun(js, err)
        result = await run.run()
        fold = run.fold
        states = fold.states()
        bucket, keep = None, False
        if args.yes:
            bucket = args.into or rebuild.default_bucket_name()
            await rebuild.write_bucket(js, bucket, states, err)
            # Compare what the bucket holds, not what we meant to write.
            stored = await rebuild.read_states(js, bucket)
            result = rebuild.diff(run.live, stored, incomplete=fold.incomplete(),
                                  log_start=run.log_start)
            keep = args.keep or not result.same
            if not keep:
                await rebuild.delete_bucket(js, bucket)
    if args.json:
        _print_json({**result.to_json(), "events_applied": fold.applied,
                     "events_skipped": fold.skipped, "rebuilt": len(states),
                     "live": len(run.live), "bucket": bucket if args.yes and keep else None},
                    out)
        return EXIT_OK if result.same else EXIT_DIFFERS
    out.write(f"folded {fold.applied} events (up to seq {fold.last_seq}; {fold.skipped} "
              f"duplicate or unknown skipped) into {len(states)} tasks; vigil-tasks holds "
              f"{len(run.live)}\n")
    if run.undecodable_live:
        out.write(f"  {len(run.undecodable_live)} live value(s) are not task states: "
                  f"{', '.join(run.undecodable_live[:5])}\n")
    _print_diff(result, out, args.show)
    if bucket is None:
        out.write("dry run: nothing written. Add --yes to write the rebuilt states into a "
                  "fresh bucket and compare what it holds.\n")
    elif keep:
        out.write(f"rebuilt states kept in bucket {bucket} (no TTL; delete it when done)\n")
    else:
        out.write(f"bucket {bucket} matched and was deleted (--keep keeps it)\n")
    out.write("the event log explains vigil-tasks\n" if result.same else
              "vigil-tasks and the event log differ (a task in flight differs until it "
              "settles: run again to confirm)\n")
    return EXIT_OK if result.same else EXIT_DIFFERS


# parser ------------------------------------------------------------------------------------
def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", metavar="URL",
                   help="NATS as the operator user (env VIGIL_NATS_URL; default: from "
                   "DIR/client.json)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where `vigil up` keeps client.json (env VIGIL_DATA_DIR, default .vigil)")


def _rate(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rate", type=float, default=replay.DEFAULT_RATE, metavar="PER_S",
                   help=f"at most this many {what} per second (default "
                   f"{replay.DEFAULT_RATE:g}; 0 = no limit)")


def _parser(sub: Any, name: str, impl: Impl, **kwargs: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    _connection_flags(p)
    p.set_defaults(func=_entry(impl), impl=impl)
    return p


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``replay`` command to the ``vigil`` parser."""
    rp = sub.add_parser(
        "replay", help="operator tools on the streams: timeline, stream, redrive, rebuild, "
        "migrate-keys",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Operator tools that talk to NATS directly (as the `operator` NATS user).\n"
        "Reading is harmless; whatever writes is a dry run that says what it would do until "
        "you add --yes,\nis rate-limited, shows progress on stderr, and is safe to run again.",
        epilog=f"{CONNECTION}\n\n" + exit_epilog(
            (EXIT_OK, "ok"), (EXIT_DIFFERS, "differs, not found, or not all succeeded"),
            (EXIT_USAGE, "usage"), (EXIT_UNREACHABLE, "NATS unreachable"), common=False))
    rsub = rp.add_subparsers(dest="replay_command", metavar="ACTION", required=True)

    t = _parser(rsub, "timeline", cmd_timeline,
                help="print a task's history across streams",
                description="Print everything Vigil recorded about one task, merged by time: "
                "its submission,\nevery event (logs, checkpoints, confessions, retries, the "
                "outcome), cancel and redrive\nrequests, and its current state in vigil-tasks.",
                epilog="examples:\n  vigil replay timeline t_abc123\n"
                "  vigil replay timeline t_abc123 --no-logs\n"
                "  vigil replay timeline t_abc123 --json | jq -r .kind\n\n" + CONNECTION)
    t.add_argument("task_id", metavar="TASK_ID")
    t.add_argument("--tenant", help="the task's tenant (ids are per tenant; needed only when "
                   "more than one tenant has a task of that id)")
    t.add_argument("--no-logs", action="store_true", help="leave out the agent's output lines")
    t.add_argument("--issues", action="store_true",
                   help="also scan VIGIL_ISSUES for confessions naming the task (reads the "
                   "whole stream)")
    t.add_argument("--json", action="store_true", help="JSON lines, the state last")

    s = _parser(rsub, "stream", cmd_stream,
                help="print a stream range as JSON lines, or re-publish it to a subject",
                description="Read a range of a stream: a subject filter, a sequence window "
                "and/or a time window.\nWithout --to, print each message as a JSON line "
                "{stream, seq, subject, time, headers, data}.\nWith --to, re-publish the range "
                "to a subject: a dry run until --yes; each copy carries\nNats-Msg-Id "
                "rp-<replay id>-<stream>-<seq>, and progress is kept in the vigil-replays\n"
                "bucket, so running the same command again publishes nothing twice and a "
                "replay that\nwas interrupted resumes. Messages re-published to vigil.submit.* "
                "are new submissions:\na spec without an id gets a new task.",
                epilog="examples:\n"
                "  vigil replay stream events --subject 'vigil.events.t_abc.>' > t_abc.jsonl\n"
                "  vigil replay stream issues --since 2h --limit 100\n"
                "  vigil replay stream VIGIL_EVENTS --from-seq 1000 --to-seq 2000 --until "
                "2024-05-01T12:00:00Z\n"
                "  vigil replay stream issues --subject 'vigil.issues.agent.>' --to "
                "vigil.issues.replay.info\n"
                "  vigil replay stream issues --subject 'vigil.issues.agent.>' --to "
                "vigil.issues.replay.info --yes --rate 100\n\n"
                "STREAM is a name (VIGIL_EVENTS) or its short form (events, submit, issues, "
                "control, ...).\nTimes are ISO 8601 (UTC when no offset) or a duration back "
                "from now: 90s, 15m, 2h, 1d.\n\n" + CONNECTION)
    s.add_argument("stream", metavar="STREAM", help="VIGIL_EVENTS, or short: events, submit, ...")
    s.add_argument("--subject", metavar="FILTER", help="subject filter, wildcards allowed")
    s.add_argument("--from-seq", type=int, metavar="N", help="first stream sequence")
    s.add_argument("--to-seq", type=int, metavar="N", help="last stream sequence")
    s.add_argument("--since", metavar="TIME", help="stored at or after (ISO, or 2h back)")
    s.add_argument("--until", metavar="TIME", help="stored at or before (ISO, or 2h back)")
    s.add_argument("--limit", type=int, default=0, metavar="N",
                   help="at most N messages (with --to: the next N of this replay)")
    s.add_argument("--to", metavar="SUBJECT", help="re-publish to this subject")
    s.add_argument("--replay-id", metavar="ID",
                   help="name the replay (default: a hash of stream, filter, window, target)")
    _rate(s, "messages")
    s.add_argument("--yes", action="store_true", help="with --to: publish (default: dry run)")
    s.add_argument("--json", action="store_true", help="with --to: the plan/result as JSON")

    r = _parser(rsub, "redrive", cmd_redrive,
                help="run dead (or failed, timed out, cancelled) tasks again as new attempts",
                description="Ask the scheduler to run finished tasks again, each as a new "
                "attempt with a fresh\nattempt budget. Chooses dead tasks by default, or "
                "the TASK_IDs given, filtered by\n--status, --tenant, --label and --since. "
                "A dry run lists them until --yes. Each request\ncarries the task's revision: "
                "one the scheduler already acted on (a rerun) does nothing.",
                epilog="examples:\n  vigil replay redrive                       # list dead "
                "tasks\n  vigil replay redrive --tenant acme --since 1d --yes\n"
                "  vigil replay redrive t_abc123 --reason 'fixed the image' --yes --wait\n"
                "  vigil replay redrive --status failed --label team=ml --yes\n\n" + CONNECTION)
    r.add_argument("task_ids", nargs="*", metavar="TASK_ID",
                   help="these tasks (default: every task that matches the filters)")
    r.add_argument("--status", action="append", choices=redrive.REDRIVABLE,
                   help="which finished tasks (repeat; default dead, or any of them for "
                   "TASK_IDs)")
    r.add_argument("--tenant", help="only this tenant's tasks")
    r.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="only tasks with this label (repeat: all must match)")
    r.add_argument("--since", metavar="TIME", help="only tasks finished at or after this")
    r.add_argument("--reason", help="why (recorded with the request and in the timeline)")
    _rate(r, "requests")
    r.add_argument("--yes", action="store_true", help="send the requests (default: dry run)")
    r.add_argument("--wait", action="store_true",
                   help="with --yes: wait until each has finished again; exit 0 only if all "
                   "succeeded")
    r.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long --wait waits (default 600)")
    r.add_argument("--json", action="store_true", help="the chosen tasks as JSON (dry run)")

    m = _parser(rsub, "migrate-keys", cmd_migrate_keys,
                help="move vigil-tasks to the per-tenant key layout of Vigil 0.2",
                description="Before 0.2 a task's key in vigil-tasks was its id; since, it is "
                "<tenant>.<id>\n(ids are per tenant). Moves every old key: creates the new "
                "one, then deletes the old\none at the revision read (a key written meanwhile "
                "is left for a rerun). Drain the\nplatform first (see the README's \"Upgrading "
                "to 0.2\"). Safe to run again.",
                epilog="examples:\n  vigil replay migrate-keys\n"
                "  vigil replay migrate-keys --yes\n\n" + CONNECTION)
    m.add_argument("--yes", action="store_true", help="move the keys (default: a dry run)")
    m.add_argument("--json", action="store_true", help="the plan (dry run) or the result as "
                   "JSON")
    m.add_argument("--show", type=int, default=20, metavar="N",
                   help="list at most N keys to move (default 20)")
    _rate(m, "keys")

    b = _parser(rsub, "rebuild", cmd_rebuild,
                help="rebuild vigil-tasks from the event log and diff it against the live one",
                description="Fold the event log (VIGIL_EVENTS, in order) and the submissions "
                "into task states,\nand compare them field by field with the live vigil-tasks "
                "bucket (id, tenant, status,\nattempt, executor, exit_code, error, created_at, "
                "finished_at, submit_seq,\ncancel_requested_at, and the spec's command, labels "
                "and pool). A dry run only compares;\n--yes also writes the rebuilt states into "
                "a fresh bucket and compares what it holds.\nThe live bucket is never written. "
                "Exit 0 when they agree, 1 when they differ.",
                epilog="examples:\n  vigil replay rebuild\n"
                "  vigil replay rebuild --yes --keep --into vigil-tasks-check\n"
                "  vigil replay rebuild --json | jq .mismatched\n\n"
                "Tasks whose history is older than the event log's max age cannot be "
                "rebuilt; they are\ncounted as aged out, not as differences.\n\n" + CONNECTION)
    b.add_argument("--into", metavar="BUCKET",
                   help="with --yes: the new bucket (default vigil-tasks-rebuild-<UTC time>; "
                   "must not exist)")
    b.add_argument("--yes", action="store_true", help="write the rebuilt bucket")
    b.add_argument("--keep", action="store_true",
                   help="keep the bucket even when it matches (a differing one is always kept)")
    b.add_argument("--show", type=int, default=20, metavar="N",
                   help="list at most N differing tasks (default 20)")
    b.add_argument("--json", action="store_true", help="the diff as JSON")
