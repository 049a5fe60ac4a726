"""The ``vigil`` command line: run a local stack, submit tasks, inspect them.

Run ``vigil --help`` or ``vigil <command> --help``. The client side reads the gateway URL
and token from flags, then ``VIGIL_GATEWAY_URL``/``VIGIL_TOKEN``, then the ``client.json``
that ``vigil up`` writes into its data directory (``./.vigil`` by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import msgspec

from vigil import __version__, auth, cli_replay, settings
from vigil.client import Client, StreamEvent
from vigil.errors import ApiError, VigilError

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ClientSettings(msgspec.Struct, frozen=True, kw_only=True):
    gateway_url: str = ""
    token: str = ""
    data_dir: str = ".vigil"


def _client_config(args: argparse.Namespace) -> tuple[str, str | None]:
    env = settings.load(ClientSettings, {k: v for k, v in _environ().items()
                                         if k in ("VIGIL_GATEWAY_URL", "VIGIL_TOKEN",
                                                  "VIGIL_DATA_DIR")})
    saved: dict[str, Any] = {}
    data_dir = Path(getattr(args, "data_dir", None) or env.data_dir)
    client_file = data_dir / "client.json"
    if client_file.exists():
        saved = json.loads(client_file.read_text(encoding="utf-8"))
    url = getattr(args, "gateway", None) or env.gateway_url or saved.get("url")
    token = getattr(args, "token", None) or env.token or saved.get("token")
    if not url:
        raise VigilError(
            "no gateway to talk to: start one with `vigil up`, or pass --gateway / set "
            "VIGIL_GATEWAY_URL (and VIGIL_TOKEN)"
        )
    return url, token


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


# output -------------------------------------------------------------------------------------
class Printer:
    """Human-readable task output: log lines, progress, confessions, the outcome."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.color = out.isatty()

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def event(self, ev: StreamEvent) -> None:
        d = ev.data
        if ev.kind == "log":
            mark = self._c("2", "│") if d.get("stream") == "stdout" else self._c("31", "│")
            for line in d.get("lines", []):
                print(f"  {mark} {line}", file=self.out)
        elif ev.kind == "progress":
            data = d.get("data", {})
            text = " ".join(f"{k}={v}" for k, v in data.items())
            print(f"  {self._c('36', '▸ progress')} {text}", file=self.out)
        elif ev.kind == "started":
            print(f"  {self._c('2', '… started')} attempt {d.get('attempt')} on "
                  f"{d.get('executor')} in {d.get('image')}", file=self.out)
        elif ev.kind == "confession":
            print(f"  {self._c('33', '⚑ confession')} [{d.get('severity')}] "
                  f"{d.get('summary')}", file=self.out)
        elif ev.kind == "retrying":
            print(f"  {self._c('33', '↻ retrying')} {d.get('reason')}", file=self.out)
        elif ev.kind == "checkpoint":
            print(f"  {self._c('36', '⬇ checkpoint')} {d.get('size')} bytes", file=self.out)
        self.out.flush()

    def outcome(self, state: Any) -> None:
        ok = state.status == "succeeded"
        mark = self._c("32", "✔") if ok else self._c("31", "✘")
        took = ""
        if state.started_at and state.finished_at:
            took = f" in {(state.finished_at - state.started_at).total_seconds():.1f}s"
        code = f" (exit {state.exit_code})" if state.exit_code is not None else ""
        print(f"{mark} task {state.id} {state.status}{took}{code}", file=self.out)
        if state.error:
            print(f"  error: {state.error}", file=self.out)
        self.out.flush()


async def follow(client: Client, task_id: str, printer: Printer) -> Any:
    async for ev in client.events(task_id):
        printer.event(ev)
    return await client.get(task_id)


# commands -----------------------------------------------------------------------------------
def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VigilError(f"{flag} takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def _spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.file:
        path = Path(args.file)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise VigilError(f"cannot read task file {path}: {exc}") from None
        if not isinstance(spec, dict):
            raise VigilError(f"task file {path} must hold a JSON object")
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
        spec["env"] = {**spec.get("env", {}), **_pairs(args.env, "--env")}
    if args.label:
        spec["labels"] = {**spec.get("labels", {}), **_pairs(args.label, "--label")}
    return spec


async def cmd_submit(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    url, token = _client_config(args)
    async with Client(url, token) as client:
        try:
            accepted = await client.submit(spec, idempotency_key=args.idempotency_key)
        except ApiError as exc:
            field = f" (field {exc.field})" if exc.field and exc.field not in str(exc) else ""
            print(f"vigil: submission refused: {exc}{field}", file=sys.stderr)
            return EXIT_USAGE
        task_id = accepted["id"]
        if args.json and not args.wait:
            print(json.dumps(accepted))
            return EXIT_OK
        if not args.json:
            print(f"submitted task {task_id} ({accepted.get('status') or 'pending'})")
        if not args.wait:
            print(f"  follow it: vigil status {task_id}   (or vigil submit --wait next time)")
            return EXIT_OK
        printer = Printer(sys.stderr if args.json else sys.stdout)
        state = await follow(client, task_id, printer)
        if args.json:
            print(msgspec.json.encode(state).decode())
        else:
            printer.outcome(state)
        return EXIT_OK if state.status == "succeeded" else EXIT_TASK_FAILED


async def cmd_status(args: argparse.Namespace) -> int:
    url, token = _client_config(args)
    async with Client(url, token) as client:
        try:
            state = await client.get(args.task_id)
            confessions = await client.confessions(args.task_id)
        except ApiError as exc:
            print(f"vigil: {exc}", file=sys.stderr)
            return EXIT_TASK_FAILED if exc.status == 404 else EXIT_USAGE
    if args.json:
        print(msgspec.json.encode(state).decode())
        return EXIT_OK
    rows = [
        ("id", state.id), ("tenant", state.tenant), ("status", state.status),
        ("attempt", state.attempt), ("executor", state.executor or "-"),
        ("exit code", "-" if state.exit_code is None else state.exit_code),
        ("error", state.error or "-"), ("created", state.created_at),
        ("started", state.started_at or "-"), ("finished", state.finished_at or "-"),
    ]
    if state.spec is not None:
        rows.insert(3, ("command", " ".join(state.spec.command)))
        rows.insert(4, ("image", state.spec.image or "-"))
    for key, value in rows:
        print(f"{key:>10}  {value}")
    for c in confessions:
        print(f"{'confessed':>10}  [{c.get('severity')}] {c.get('source')}: {c.get('summary')}")
    return EXIT_OK


async def cmd_up(args: argparse.Namespace) -> int:
    from vigil.embedded import Stack, StackConfig, StackError

    config = StackConfig(
        data_dir=Path(args.data_dir), nats_port=args.nats_port, http_port=args.http_port,
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
        follow_task = asyncio.create_task(follow(client, accepted["id"], printer))
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
  raw NATS: publish a JSON task spec to vigil.submit.<tenant> (credentials in {d}/client.json)
Logs of each service: {d}/logs/""", flush=True)


async def cmd_nats_config(args: argparse.Namespace) -> int:
    """Render a production nats-server config with Vigil's least-privilege users."""
    from vigil.natsserver import NatsServer, User
    from vigil.permissions import service_permissions

    users = [User("admin", "$VIGIL_ADMIN_PASSWORD")]
    for name, (pub, sub) in service_permissions(args.pool).items():
        users.append(User(name, f"$VIGIL_{name.upper()}_PASSWORD", publish=pub, subscribe=sub))
    server = NatsServer(store_dir=Path(args.store_dir), port=args.port, host=args.host,
                        sync_always=True, users=users, name=args.server_name,
                        cluster_name=args.cluster_name, cluster_port=args.cluster_port,
                        routes=list(args.route or []))
    text = server.config_text().replace(
        f'"{Path(args.store_dir) / "jetstream"}"', json.dumps(args.store_dir))
    print("# nats-server config for Vigil, from `vigil nats-config`: JetStream on file storage,")
    print("# fsync before every ack (sync_interval: always), one least-privilege user per")
    print("# service. Passwords come from the server's environment ($VIGIL_*_PASSWORD).")
    print(text, end="")
    return EXIT_OK


async def cmd_incidents(args: argparse.Namespace) -> int:
    url, token = _client_config(args)
    async with Client(url, token) as client:
        try:
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
        except ApiError as exc:
            print(f"vigil: {exc}", file=sys.stderr)
            return EXIT_TASK_FAILED if exc.status == 404 else EXIT_USAGE
    if args.json or args.action != "show":
        print(json.dumps(data, default=str) if args.json else
              f"incident {data['id']} is now {data['status']}")
        return EXIT_OK
    for key in ("id", "title", "source", "category", "severity", "status", "count",
                "first_seen", "last_seen", "tenants", "reopened"):
        print(f"{key:>11}  {data.get(key)}")
    print(f"{'tasks':>11}  {', '.join(data.get('tasks', [])[:10])}")
    for sample in data.get("first_samples", []) + data.get("last_samples", []):
        print(f"{'sample':>11}  {sample['time'][:19]}  {sample.get('task_id') or '-'}  "
              f"{sample['summary'][:80]}")
    return EXIT_OK


async def cmd_token_create(args: argparse.Namespace) -> int:
    token = auth.add_token(args.file, args.name, args.tenant, args.role)
    print(token)
    print(f"(stored only as a SHA-256 digest in {args.file}; this is the only time the token "
          "is shown)", file=sys.stderr)
    return EXIT_OK


# parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vigil",
        description="Vigil runs long-lived AI agents in rootless containers and keeps them "
        "running through node loss.",
        epilog="Start with `vigil up`, then `vigil submit --wait -- echo hello`.",
    )
    p.add_argument("--version", action="version", version=f"vigil {__version__}")
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND")

    def client_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--gateway", metavar="URL", help="gateway URL (env VIGIL_GATEWAY_URL)")
        sp.add_argument("--token", help="API token (env VIGIL_TOKEN)")
        sp.add_argument("--data-dir", help="read URL/token from DIR/client.json "
                        "(default .vigil, env VIGIL_DATA_DIR)")

    up = sub.add_parser("up", help="run NATS, Podman and all four services locally",
                        description="Start a complete local Vigil: a nats-server (JetStream, "
                        "fsync on every write), the rootless Podman API service, and the "
                        "scheduler, executor, auditor and gateway. Runs until Ctrl-C.")
    up.add_argument("--data-dir", default=".vigil", help="state, logs, secrets (default .vigil)")
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

    sm = sub.add_parser("submit", help="submit a task (optionally wait, printing its output)",
                        description="Submit a task to the gateway.",
                        epilog="example: vigil submit --wait --env STEPS=3 -- python3 "
                        "/opt/vigil/demo_agent.py")
    sm.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    sm.add_argument("-f", "--file", help="JSON task spec file (flags override its fields)")
    sm.add_argument("--image", help="container image (default: the platform's agent image)")
    sm.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment (repeat)")
    sm.add_argument("--label", action="append", metavar="KEY=VALUE", help="label (repeat)")
    sm.add_argument("--timeout", type=float, metavar="SECONDS", help="wall-clock limit")
    sm.add_argument("--max-attempts", type=int, metavar="N", help="attempts before dead")
    sm.add_argument("--id", help="task id (default: assigned)")
    sm.add_argument("--pool", help="executor pool (default: default)")
    sm.add_argument("--idempotency-key", metavar="KEY",
                    help="submitting again with the same key returns the same task")
    sm.add_argument("-w", "--wait", action="store_true",
                    help="follow the task's output until it ends; exit 0 only on success")
    sm.add_argument("--json", action="store_true", help="print JSON for scripts")
    client_flags(sm)
    sm.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="show a task's state", description="Show a task's "
                        "state from the vigil-tasks bucket.")
    st.add_argument("task_id")
    st.add_argument("--json", action="store_true", help="print the raw state as JSON")
    client_flags(st)
    st.set_defaults(func=cmd_status)

    nc = sub.add_parser("nats-config", help="print a nats-server config with Vigil's users",
                        description="Print a production nats-server configuration: JetStream "
                        "with sync_interval: always and one least-privilege user per service "
                        "(passwords read from $VIGIL_<SERVICE>_PASSWORD).")
    nc.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a server config's default
    nc.add_argument("--port", type=int, default=4222)
    nc.add_argument("--store-dir", default="/data", help="JetStream storage directory")
    nc.add_argument("--pool", default="default", help="executor pool the users may pull")
    nc.add_argument("--server-name", default="vigil-1", help="unique per cluster node")
    nc.add_argument("--cluster-name", help="join a JetStream cluster of this name (use 3 "
                    "nodes, and VIGIL_REPLICAS=3 on the services, for R3 streams)")
    nc.add_argument("--cluster-port", type=int, default=6222)
    nc.add_argument("--route", action="append", metavar="URL",
                    help="another node's route URL, nats://host:6222 (repeat)")
    nc.set_defaults(func=cmd_nats_config)

    inc = sub.add_parser("incidents", help="list, show, acknowledge, resolve incidents",
                         description="Incidents are confessions triaged by the auditor: one "
                         "per problem, counted, escalated, alerted once.",
                         epilog="examples: vigil incidents; vigil incidents show inc_…; "
                         "vigil incidents ack inc_…")
    inc.add_argument("action", nargs="?", default="list",
                     choices=("list", "show", "ack", "resolve"))
    inc.add_argument("incident_id", nargs="?")
    inc.add_argument("--status", choices=("open", "acknowledged", "resolved"))
    inc.add_argument("--severity", choices=("info", "warning", "error", "critical"))
    inc.add_argument("--tenant")
    inc.add_argument("--json", action="store_true", help="print JSON for scripts")
    client_flags(inc)
    inc.set_defaults(func=cmd_incidents)

    tk = sub.add_parser("token", help="manage gateway API tokens")
    tks = tk.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    tc = tks.add_parser("create", help="create a token and store its digest",
                        description="Create an API token for the gateway. The token is "
                        "printed once; only its SHA-256 digest is stored.")
    tc.add_argument("--tenant", required=True)
    tc.add_argument("--role", choices=auth.ROLES, default="submitter")
    tc.add_argument("--name", default="token", help="a label for the token")
    tc.add_argument("--file", default=".vigil/tokens.json", help="tokens file (VIGIL_TOKENS_FILE)")
    tc.set_defaults(func=cmd_token_create)

    cli_replay.register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(EXIT_USAGE)
    try:
        code = asyncio.run(args.func(args))
    except VigilError as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        code = EXIT_UNREACHABLE if exc.retryable else EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
