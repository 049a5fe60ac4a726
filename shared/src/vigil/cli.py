"""The ``vigil`` command line: run a local stack, submit tasks, inspect them.

Run ``vigil --help`` or ``vigil <command> --help``. The task commands live in
:mod:`vigil.cli_tasks`, configuration (gateway URL and token: flags, env, a config file,
``vigil up``'s ``client.json``) in :mod:`vigil.cli_config`, output helpers and exit codes
in :mod:`vigil.cli_output`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from vigil import (
    __version__,
    auth,
    cli_config,
    cli_env,
    cli_fleet,
    cli_images,
    cli_replay,
    cli_secrets,
    cli_tasks,
    ids,
    subjects,
)
from vigil.cli_config import add_client_flags, open_client
from vigil.cli_output import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_STATUSES,
    EXIT_TASK_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Printer,
    error_text,
    exit_code,
    exit_epilog,
    out_json,
)
from vigil.client import Client
from vigil.errors import VigilError

# Kept importable from here: other tools built on the CLI use them.
__all__ = ["EXIT_OK", "EXIT_RATE_LIMITED", "EXIT_TASK_FAILED", "EXIT_TIMEOUT",
           "EXIT_UNREACHABLE", "EXIT_USAGE", "Printer", "build_parser", "main"]

async def cmd_up(args: argparse.Namespace) -> int:
    from vigil.embedded import Stack, StackConfig, StackError

    config = StackConfig(
        data_dir=Path(args.data_dir or cli_config.DEFAULT_DATA_DIR),
        nats_port=args.nats_port, http_port=args.http_port,
        slots=args.slots, runtime=args.runtime, podman_user=args.podman_user,
        log_level=args.log_level,
        extra_env={"VIGIL_UNSAFE_RUNTIME": "1"} if args.runtime != "podman" else {},
    )
    stack = Stack(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"Vigil {__version__}: starting a local stack in {config.data_dir}/")
    try:
        try:
            await stack.start()
        except (StackError, VigilError) as exc:
            print(f"vigil up: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"\nVigil is up. Gateway: {stack.gateway_url}  (token in {config.data_dir}/"
              "client.json)")
        if args.demo and not stop.is_set():
            code = await _demo(stack, stop)
            if code != EXIT_OK:
                return code
        _how_to(stack, config)
        supervisor = asyncio.create_task(stack.supervise(stop))
        await supervisor
        if stack.failed:
            print(f"vigil up: {stack.failed}", file=sys.stderr)
            return EXIT_UNREACHABLE
        return EXIT_OK
    finally:
        print("\nstopping Vigil…", flush=True)
        await stack.stop()
        print("stopped; nothing left running.", flush=True)


async def _demo(stack: Any, stop: asyncio.Event) -> int:
    print("\nRunning the demo agent task (python3 /opt/vigil/demo_agent.py in a rootless "
          "container):")
    printer = Printer()
    async with Client(stack.gateway_url, stack.token) as client:
        started = time.monotonic()
        accepted = await client.submit({"command": ["python3", "/opt/vigil/demo_agent.py"],
                                        "labels": {"demo": "1"}})
        print(f"  submitted {accepted['id']}")
        follow_task = asyncio.create_task(cli_tasks.follow_events(client, accepted["id"],
                                                                  printer))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({follow_task, stopper}, timeout=300,
                                     return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if follow_task not in done:
            follow_task.cancel()
            print("demo interrupted" if stop.is_set() else "demo task did not finish in 300s",
                  file=sys.stderr)
            return EXIT_TASK_FAILED
        state = follow_task.result()
        printer.outcome(state)
        print(f"  (submit → finished: {time.monotonic() - started:.2f}s)")
        return EXIT_OK if state.status == "succeeded" else EXIT_TASK_FAILED


def _how_to(stack: Any, config: Any) -> None:
    d = config.data_dir
    extra = f" --data-dir {d}" if str(d) != ".vigil" else ""
    vigil = Path(sys.argv[0])
    if vigil.is_absolute():
        with contextlib.suppress(ValueError):
            vigil = vigil.relative_to(Path.cwd())
    print(f"""
Submit more tasks (Ctrl-C stops everything):
  {vigil} submit{extra} --wait -- python3 -c 'print("hello")'
  curl -H "Authorization: Bearer $(jq -r .token {d}/client.json)" \\
       -d '{{"command": ["echo", "hi"]}}' {stack.gateway_url}/v1/tasks
  raw NATS: as tenant default's own user (nats_submit_url in {d}/client.json, with its
    inbox prefix nats_submit_inbox_prefix) publish a JSON task spec to vigil.submit.default;
    another tenant's user: vigil nats-user add --tenant acme
Secrets by reference (sealed with the key in {d}/secrets.key; back it up):
  printf %s "$ANTHROPIC_API_KEY" | {vigil} secret set llm-key{extra}
  then name it in a task: "secrets": {{"ANTHROPIC_API_KEY": "llm-key"}}
Logs of each service: {d}/logs/""", flush=True)


async def cmd_nats_config(args: argparse.Namespace) -> int:
    """Render a production nats-server config with Vigil's least-privilege users."""
    from vigil import natsusers
    from vigil.natsserver import NatsServer
    from vigil.permissions import SERVICES, shipped_users

    passwords = {name: f"$VIGIL_{name.upper()}_PASSWORD" for name in (*SERVICES, "admin")}
    tenants = natsusers.load(Path(args.users_file)) if args.users_file else []
    users = shipped_users(passwords, tenants, pool=args.pool)
    server = NatsServer(store_dir=Path(args.store_dir), port=args.port, host=args.host,
                        sync_always=True, users=users, name=args.server_name,
                        cluster_name=args.cluster_name, cluster_port=args.cluster_port,
                        routes=list(args.route or []))
    text = server.config_text().replace(
        f'"{Path(args.store_dir) / "jetstream"}"', json.dumps(args.store_dir))
    print("# nats-server config for Vigil, from `vigil nats-config`: JetStream on file storage,")
    print("# fsync before every ack (sync_interval: always), one least-privilege user per")
    print("# service. Passwords come from the server's environment ($VIGIL_*_PASSWORD);")
    print("# tenants' users (--users-file) carry their own. Keep this file private (0600).")
    print(text, end="")
    return EXIT_OK


async def cmd_incidents(args: argparse.Namespace) -> int:
    async with open_client(args, platform=args.platform) as client:
        if args.action == "list":
            found = await client.incidents(status=args.status or "",
                                           severity=args.severity or "",
                                           tenant=args.tenant or "")
            if args.json:
                print(json.dumps(found, default=str))
                return EXIT_OK
            if not found:
                print("no incidents")
                return EXIT_OK
            print(f"{'ID':<26} {'SEVERITY':<9} {'STATUS':<13} {'COUNT':>6}  "
                  f"{'LAST SEEN':<20} TITLE")
            for i in found:
                print(f"{i['id']:<26} {i['severity']:<9} {i['status']:<13} "
                      f"{i['count']:>6}  {i['last_seen'][:19]:<20} "
                      f"{i['source']}: {i['title'][:70]}")
            return EXIT_OK
        if not args.incident_id:
            raise VigilError(f"`vigil incidents {args.action}` needs an incident id")
        if args.action == "show":
            data = await client.incident(args.incident_id)
        else:
            data = await client.incident_action(args.incident_id, args.action)
    if args.json or args.action != "show":
        if args.json:
            print(json.dumps(data, default=str))
        elif data.get("note"):  # 202: recorded, not applied by the auditor yet
            print(f"incident {data['id']}: {args.action} recorded; the auditor has not "
                  f"applied it yet (status still {data['status']}): check with "
                  f"`vigil incidents show {data['id']}`")
        else:
            print(f"incident {data['id']} is now {data['status']}")
        return EXIT_OK
    for key in ("id", "title", "source", "category", "severity", "status", "count",
                "first_seen", "last_seen", "reopened", "acknowledged_by", "resolved_by"):
        if data.get(key) is not None:
            print(f"{key:>11}  {data[key]}")
    print(f"{'tenants':>11}  {', '.join(data.get('tenants', [])) or '-'}")
    tasks = list(data.get("tasks", []))
    total = max(int(data.get("tasks_total") or 0), len(tasks))
    more = f" … ({total} in all)" if total > 10 else ""
    print(f"{'tasks':>11}  {', '.join(tasks[:10]) or '-'}{more}")
    for sample in data.get("first_samples", []) + data.get("last_samples", []):
        print(f"{'sample':>11}  {sample['time'][:19]}  {sample.get('task_id') or '-'}  "
              f"{sample['summary'][:80]}")
    return EXIT_OK


async def cmd_nats_user(args: argparse.Namespace) -> int:
    """Manage tenants' raw NATS users (see vigil.natsusers)."""
    from vigil import natsusers

    path = Path(args.file)
    if args.user_command == "add":
        user = natsusers.add(path, args.tenant, args.name)
        host = args.server.split("://", 1)[-1]
        url = f"nats://{user.name}:{user.password}@{host}"
        print(out_json({"name": user.name, "tenant": user.tenant, "url": url,
                        "inbox_prefix": subjects.tenant_inbox(user.tenant)})
              if args.json else url)
        print(f"(connect with inbox_prefix=\"{subjects.tenant_inbox(user.tenant)}\"; it may "
              f"publish to {subjects.submit(user.tenant)} and "
              f"{subjects.cancel_request(user.tenant)}, read its tenant's keys "
              f"{user.tenant}.<id> of {subjects.KV_TASKS} and subscribe to "
              f"{subjects.EVENTS}.{user.tenant}.>; the password is shown only now and is "
              f"kept in {path}; a running `vigil up` picks the user up within a second)",
              file=sys.stderr)
        return EXIT_OK
    if args.user_command == "list":
        users = natsusers.load(path)
        if args.json:  # never the passwords
            print(out_json({"users": [{"name": u.name, "tenant": u.tenant} for u in users]}))
            return EXIT_OK
        for u in users:
            print(f"{u.name:<32} tenant {u.tenant}")
        return EXIT_OK
    gone = next((u for u in natsusers.load(path) if u.name == args.name), None)
    if gone is None or not natsusers.remove(path, args.name):
        print(f"vigil: no NATS user {args.name!r} in {path}", file=sys.stderr)
        return EXIT_TASK_FAILED
    if args.json:
        print(out_json({"name": gone.name, "tenant": gone.tenant}))
    else:
        print(f"removed {args.name} (a running `vigil up` reloads nats-server within a "
              "second; the user's open connections are closed then)")
    return EXIT_OK


async def cmd_token_create(args: argparse.Namespace) -> int:
    if (args.tenant is None) == (not args.platform):
        raise VigilError("name the token's tenant (--tenant acme), or make a cross-tenant "
                         "token with --platform (not both)")
    scope: auth.Scope = "platform" if args.platform else "tenant"
    token = auth.add_token(args.file, args.name, args.tenant, args.role, scope)
    print(out_json({"token": token, "name": args.name, "tenant": args.tenant,
                    "role": args.role, "scope": scope}) if args.json else token)
    print(f"(stored only as a SHA-256 digest in {args.file}; this is the only time the token "
          "is shown)", file=sys.stderr)
    return EXIT_OK


# parser -------------------------------------------------------------------------------------
# The commands without --json, and what they do instead (already what a script wants).
NO_JSON = {"up": "runs Vigil in the foreground", "logs": "prints the task's own output",
           "nats-config": "prints a config file", "secret keygen": "prints a key line"}


def _json_note() -> str:
    *most, last = [f"`{command}` ({what})" for command, what in NO_JSON.items()]
    return textwrap.fill(f"--json: every command prints its result as JSON for scripts, "
                         f"except {', '.join(most)} and {last}.", width=88,
                         break_on_hyphens=False)


def _exit_table() -> str:
    lines = []
    for code, meaning in EXIT_STATUSES:
        wrapped = textwrap.wrap(meaning, width=80, break_on_hyphens=False)
        lines.append(f"  {code:<4} {wrapped[0]}")
        lines += [f"       {more}" for more in wrapped[1:]]
    return "\n".join(lines)


EPILOG = f"""\
Start with `vigil up`, then `vigil submit --wait -- echo hello`.

everyday use:
  vigil submit -f task.yaml            vigil list --status active --since 1h
  vigil logs -f TASK_ID                vigil wait TASK_ID --timeout 600
  vigil status TASK_ID                 vigil cancel TASK_ID --reason "…" --wait

exit status:
{_exit_table()}
  (the same for every command; each one's --help says what its codes mean for it)

{_json_note()}

{cli_config.HELP}"""


def _tenant_name(value: str) -> str:
    if not ids.is_valid_id(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a tenant name ([A-Za-z0-9_-]{{1,64}})")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vigil",
        description="Vigil runs long-lived AI agents in rootless containers and keeps them "
        "running through node loss.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"vigil {__version__}")
    add_client_flags(p, top_level=True)
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND")

    up = sub.add_parser("up", help="run NATS, Podman and all four services locally",
                        description="Start a complete local Vigil: a nats-server (JetStream, "
                        "fsync on every write), the rootless Podman API service, and the "
                        "scheduler, executor, auditor and gateway. Runs until Ctrl-C.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  vigil up --demo\n  vigil up --http-port 9080 "
                        "--nats-port 5222 --data-dir /tmp/vigil\n\n" + exit_epilog(
                            (EXIT_OK, "stopped by Ctrl-C or SIGTERM"),
                            (EXIT_TASK_FAILED, "--demo's task did not succeed"),
                            (EXIT_UNREACHABLE, "the stack could not start, or a part of it "
                             "failed"), common=False))
    up.add_argument("--data-dir", default=argparse.SUPPRESS,
                    help="state, logs, secrets (default .vigil)")
    up.add_argument("--nats-port", type=int, default=4222, help="NATS client port (4222)")
    up.add_argument("--http-port", type=int, default=8080,
                    help="gateway port; the other services use the next three (8080)")
    up.add_argument("--slots", type=int, default=4, help="agents run at once (4)")
    up.add_argument("--runtime", choices=("podman", "process", "null"), default="podman",
                    help="container runtime; process/null are UNSAFE, for benchmarks")
    up.add_argument("--podman-user", help="unprivileged user for rootless Podman when run "
                    "as root (default vigil)")
    up.add_argument("--demo", action="store_true", help="run the demo agent task once up")
    up.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    up.set_defaults(func=cmd_up)

    cli_tasks.register(sub)
    cli_env.register(sub)
    cli_fleet.register(sub)

    inc = sub.add_parser("incidents", help="list, show, acknowledge, resolve incidents",
                         description="Incidents are confessions triaged by the auditor: one "
                         "per problem, counted, escalated, alerted once.",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="examples:\n  vigil incidents\n  vigil incidents show inc_…\n"
                         "  vigil incidents ack inc_…\n\n--json: the list as a JSON array of "
                         "incidents; show, ack and resolve: the\n  incident as the API "
                         "answers it.\n\n" + exit_epilog(
                             (EXIT_OK, "done"), (EXIT_TASK_FAILED, "no such incident")))
    inc.add_argument("action", nargs="?", default="list",
                     choices=("list", "show", "ack", "resolve"))
    inc.add_argument("incident_id", nargs="?")
    inc.add_argument("--status", choices=("open", "acknowledged", "resolved"))
    inc.add_argument("--severity", choices=("info", "warning", "error", "critical"))
    inc.add_argument("--tenant")
    inc.add_argument("--json", action="store_true", help="print JSON for scripts")
    inc.add_argument("--platform", action="store_true",
                     help="as the platform's operator (cross-tenant: every tenant's incidents, "
                     "and ack/resolve of the platform's own), with the platform token "
                     "(VIGIL_PLATFORM_TOKEN, or the one `vigil up` wrote)")
    add_client_flags(inc)
    inc.set_defaults(func=cmd_incidents)

    cli_replay.register(sub)
    cli_images.register(sub)
    cli_secrets.register(sub)
    cli_config.register(sub)

    tk = sub.add_parser("token", help="manage gateway API tokens",
                        description="Manage the gateway's API tokens (stored as digests).",
                        epilog="example: vigil token create --tenant acme --role submitter "
                        "--name ci")
    tks = tk.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    tc = tks.add_parser("create", help="create a token and store its digest",
                        description="Create an API token for the gateway. The token is "
                        "printed once; only its SHA-256 digest is stored.")
    tc.add_argument("--tenant", help="the tenant the token acts for (whatever its role, it "
                    "sees nothing of other tenants)")
    tc.add_argument("--platform", action="store_true",
                    help="a cross-tenant token instead: every tenant's incidents and "
                    "executors, no tasks (for the platform's own operators)")
    tc.add_argument("--role", choices=auth.ROLES, default="submitter")
    tc.add_argument("--name", default="token", help="a label for the token")
    tc.add_argument("--file", default=".vigil/tokens.json", help="tokens file (VIGIL_TOKENS_FILE)")
    tc.add_argument("--json", action="store_true",
                    help="print {token, name, tenant, role, scope} instead of the token alone")
    tc.set_defaults(func=cmd_token_create)

    nc = sub.add_parser("nats-config", help="print a nats-server config with Vigil's users",
                        description="Print a production nats-server configuration: JetStream "
                        "with sync_interval: always and one least-privilege user per service "
                        "(passwords read from $VIGIL_<SERVICE>_PASSWORD).",
                        epilog="example: vigil nats-config --cluster-name vigil --route "
                        "nats://n2:6222 --route nats://n3:6222 > nats.conf")
    nc.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a server config's default
    nc.add_argument("--port", type=int, default=4222)
    nc.add_argument("--store-dir", default="/data", help="JetStream storage directory")
    nc.add_argument("--pool", help="the only executor pool the executor user may pull "
                    "(default: every pool)")
    nc.add_argument("--server-name", default="vigil-1", help="unique per cluster node")
    nc.add_argument("--cluster-name", help="join a JetStream cluster of this name (use 3 "
                    "nodes, and VIGIL_REPLICAS=3 on the services, for R3 streams)")
    nc.add_argument("--cluster-port", type=int, default=6222)
    nc.add_argument("--route", action="append", metavar="URL",
                    help="another node's route URL, nats://host:6222 (repeat)")
    nc.add_argument("--users-file", help="also the tenants' users from this file (made by "
                    "`vigil nats-user add --file ...`)")
    nc.set_defaults(func=cmd_nats_config)

    nu = sub.add_parser("nats-user", help="manage tenants' raw NATS users",
                        description="Each tenant's own NATS user may submit and cancel as that "
                        "tenant, read that tenant's task states and follow its events: "
                        "nothing of any other tenant. The server enforces it.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  vigil nats-user add --tenant acme\n\n" + exit_epilog(
                            (EXIT_OK, "done"), (EXIT_TASK_FAILED, "remove: no such user"),
                            (EXIT_USAGE, "bad input"), common=False))
    nus = nu.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    na = nus.add_parser("add", help="add a user for a tenant and print its URL (once)")
    na.add_argument("--tenant", required=True, type=_tenant_name)
    na.add_argument("--name", help="the user's name (default tenant-<tenant>)")
    na.add_argument("--server", default="127.0.0.1:4222",
                    help="host:port to print in the URL (default 127.0.0.1:4222)")
    nus.add_parser("list", help="list the users (not their passwords)")
    nr = nus.add_parser("remove", help="remove a user")
    nr.add_argument("name")
    for p_ in nus.choices.values():
        p_.add_argument("--json", action="store_true", help="print JSON (add: {name, tenant, "
                        "url, inbox_prefix}; list: {users: [{name, tenant}]}; remove: the "
                        "removed user's {name, tenant})")
        p_.add_argument("--file", default=".vigil/nats-users.json",
                        help="the users file (vigil up reads .vigil/nats-users.json)")
    nu.set_defaults(func=cmd_nats_user)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vigil`` command; exits with the command's status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(EXIT_USAGE)
    try:
        code = asyncio.run(args.func(args))
    except VigilError as exc:  # the gateway's refusals among them: see exit_code
        print(f"vigil: {error_text(exc)}", file=sys.stderr)
        code = exit_code(exc)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # `vigil logs … | head`: the reader has gone, which is not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_OK
    raise SystemExit(code)
