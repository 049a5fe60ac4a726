"""``vigil env``: a tenant's persistent environments, through the gateway.

An environment is a named workspace that outlives tasks, with the image, egress and
secrets its tasks default to. A task that names it (`vigil submit --environment NAME`)
starts from its latest snapshot and commits its workspace back when it succeeds; its
policy says what a second task gets while one runs (wait: they take turns; fail: the
later commit is refused and that task fails, saying so).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from vigil import ids
from vigil.api import EnvironmentList
from vigil.cli_config import add_client_flags, open_client
from vigil.cli_output import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    EXIT_USAGE,
    age,
    exit_epilog,
    out_json,
    table,
    terminal_width,
)
from vigil.cli_tasks import pairs
from vigil.client import GatewayError
from vigil.environments import POLICIES, Environment, EnvironmentSpec
from vigil.errors import VigilError


def _name(value: str) -> str:
    if not ids.is_valid_id(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an environment name ([A-Za-z0-9_-]{{1,64}})")
    return value


def spec_from_args(args: argparse.Namespace, current: EnvironmentSpec | None = None
                   ) -> dict[str, Any]:
    """The environment's settings: ``current`` ones (``vigil env set``), flags over them.
    A dict, so that the gateway judges the values and names the field at fault."""
    spec: dict[str, Any] = {}
    if current is not None:
        spec = {"image": current.image, "policy": current.policy,
                "secrets": dict(current.secrets)}
        if current.egress is not None:
            spec["egress"] = {"allow": list(current.egress.allow)}
    if args.image is not None:
        spec["image"] = args.image
    if getattr(args, "no_image", False):
        spec["image"] = None
    if args.policy is not None:
        spec["policy"] = args.policy
    if args.egress:
        allow = [] if getattr(args, "no_egress", False) else list(
            spec.get("egress", {}).get("allow", []))
        spec["egress"] = {"allow": [*allow, *(e for e in args.egress if e not in allow)]}
    elif getattr(args, "no_egress", False):
        spec.pop("egress", None)
    secrets = dict(spec.get("secrets", {}))
    for name in getattr(args, "unset_secret", None) or []:
        if name not in secrets:
            raise VigilError(f"--unset-secret {name}: the environment sets no secret {name}")
        del secrets[name]
    secrets.update(pairs(args.secret, "--secret"))
    spec["secrets"] = secrets
    return {k: v for k, v in spec.items() if v is not None}


def render(envs: Sequence[Environment], *, width: int | None = None,
           now: datetime | None = None) -> list[str]:
    """The ``vigil env list`` table."""
    headers = ("NAME", "POLICY", "REVISION", "HELD BY", "UPDATED", "IMAGE")
    rows = []
    for e in envs:
        held = e.holder
        by = f"{held.task_id} (a{held.attempt})" if held and (
            now is None or held.expires_at > now) else "-"
        rows.append((e.name, e.policy, str(e.revision), by, age(e.updated_at, now),
                     e.image or "(the platform's default)"))
    return table(headers, rows, width=width, right=frozenset({2, 4}))


def show(e: Environment, now: datetime) -> list[str]:
    """``vigil env show``: one environment, a line per setting."""
    snap = e.snapshot
    held = e.holder
    lines = [f"{'name':>10}  {e.name}", f"{'policy':>10}  {e.policy}",
             f"{'image':>10}  {e.image or '(the platform default)'}",
             f"{'egress':>10}  {', '.join(e.egress.allow) if e.egress else '(none: no network)'}",
             f"{'secrets':>10}  " + (", ".join(f"{k}={v}" for k, v in sorted(
                 e.secrets.items())) or "-"),
             f"{'revision':>10}  {e.revision}"]
    if snap is not None:
        by = (f"task {snap.task_id} (attempt {snap.attempt})" if snap.task_id else
              f"a restore of revision {snap.restored_from}")
        lines.append(f"{'snapshot':>10}  {snap.name}, {snap.size} bytes, {snap.digest[:19]}…, "
                     f"by {by}, {age(snap.committed_at, now)} ago")
    if held is not None and held.expires_at > now:
        lines.append(f"{'held by':>10}  task {held.task_id} (attempt {held.attempt}) on "
                     f"{held.executor}")
    return lines


async def cmd_env(args: argparse.Namespace) -> int:
    action = args.env_command
    async with open_client(args) as client:
        if action == "list":
            found = await client.environments()
            if args.json:
                print(out_json(EnvironmentList(environments=found)))
            elif not found:
                print("no environments (create one: vigil env create NAME --image IMAGE)",
                      file=sys.stderr)
            else:
                for line in render(found, width=terminal_width(sys.stdout),
                                   now=datetime.now(UTC)):
                    print(line)
            return EXIT_OK
        if action == "create":
            try:
                await client.environment(args.name)
            except GatewayError as exc:
                if exc.status != 404:
                    raise
            else:
                raise VigilError(f"environment {args.name} exists already; change it with "
                                 f"`vigil env set {args.name} …`")
            env, _ = await client.put_environment(args.name, spec_from_args(args))
            return _print(args, env, f"created environment {env.name} (policy {env.policy})")
        if action == "set":
            current = await client.environment(args.name)
            env, _ = await client.put_environment(args.name,
                                                  spec_from_args(args, current.spec()))
            return _print(args, env, f"environment {env.name} changed; its workspace (revision "
                          f"{env.revision}) is kept")
        if action == "show":
            env = await client.environment(args.name)
            if args.json:
                print(out_json(env))
            else:
                for line in show(env, datetime.now(UTC)):
                    print(line)
            return EXIT_OK
        if action == "history":
            history = await client.environment_history(args.name)
            if args.json:
                print(out_json(history))
                return EXIT_OK
            now = datetime.now(UTC)
            rows = [(str(s.revision), age(s.committed_at, now),
                     s.task_id or f"(restore of {s.restored_from})", str(s.size), s.name)
                    for s in history.history]
            for line in table(("REVISION", "AGE", "BY", "BYTES", "SNAPSHOT"), rows,
                              right=frozenset({0, 3}), width=terminal_width(sys.stdout)):
                print(line)
            if not rows:
                print(f"environment {args.name} has no snapshot yet (revision 0)",
                      file=sys.stderr)
            return EXIT_OK
        if action == "restore":
            env = await client.restore_environment(args.name, args.revision)
            return _print(args, env, f"environment {env.name} is at revision {env.revision}: "
                          f"the snapshot of revision {args.revision} (the history keeps "
                          "what it replaced)")
        if action == "rm":
            env = await client.environment(args.name)
            if not args.yes:
                print(f"would delete environment {env.name} (revision {env.revision}) and its "
                      f"{len(env.history)} snapshots, for good; run again with --yes",
                      file=sys.stderr)
                return EXIT_USAGE
            await client.delete_environment(args.name)
            return _print(args, env, f"deleted environment {env.name} and its snapshots")
    raise VigilError(f"unknown action {action!r}")


def _print(args: argparse.Namespace, env: Environment, message: str) -> int:
    print(out_json(env) if args.json else message)
    return EXIT_OK


def _settings_flags(p: argparse.ArgumentParser, *, changing: bool) -> None:
    p.add_argument("--image", help="the image of its tasks that name none")
    p.add_argument("--policy", choices=POLICIES,
                   help="wait: its tasks take turns (the default); fail: they run side by "
                   "side and a task whose environment moved on fails instead of committing")
    p.add_argument("--egress", action="append", metavar="HOST",
                   help="a host its tasks may reach (host, *.domain, either with :port; "
                   "repeat)")
    p.add_argument("--secret", action="append", metavar="ENV=SECRET",
                   help="a secret of the tenant its tasks get as $ENV (repeat)")
    if changing:
        p.add_argument("--no-image", action="store_true",
                       help="tasks naming no image get the platform's default")
        p.add_argument("--no-egress", action="store_true",
                       help="drop the egress list (with --egress: replace it)")
        p.add_argument("--unset-secret", action="append", metavar="ENV",
                       help="drop a secret (repeat)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``env`` to the ``vigil`` parser."""
    env = sub.add_parser(
        "env", help="persistent environments: a workspace that outlives tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].strip() if __doc__ else None,
        epilog="""examples:
  vigil env create research --image localhost/agent:v2 --egress api.example.com
  vigil submit --environment research --wait -- python3 agent.py
  vigil env history research
  vigil env restore research 3
  vigil env set research --policy fail
  vigil env rm research --yes

--json prints the environment as the API answers it (rm: as it was; list:
  {"environments": [...]}; history: {"name", "revision", "history": [...]}).

a viewer token reads, a submitter creates, changes and restores, an operator deletes.

""" + exit_epilog((EXIT_OK, "done"), (EXIT_TASK_FAILED, "no such environment"),
                  (EXIT_USAGE, "refused (the message names the field) or rm without "
                   "--yes")))
    actions = env.add_subparsers(dest="env_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create an environment")
    create.add_argument("name", type=_name)
    _settings_flags(create, changing=False)
    change = actions.add_parser("set", help="change an environment's settings (flags over "
                                "its current ones; its workspace is kept)")
    change.add_argument("name", type=_name)
    _settings_flags(change, changing=True)
    actions.add_parser("list", help="list the tenant's environments")
    for verb, text in (("show", "show one environment"),
                       ("history", "list the snapshots it keeps, newest first")):
        actions.add_parser(verb, help=text).add_argument("name", type=_name)
    restore = actions.add_parser("restore", help="make a kept revision current again (as a "
                                 "new revision)")
    restore.add_argument("name", type=_name)
    restore.add_argument("revision", type=int)
    rm = actions.add_parser("rm", help="delete an environment and its snapshots")
    rm.add_argument("name", type=_name)
    rm.add_argument("--yes", action="store_true", help="really delete (else: say what would go)")
    for p in actions.choices.values():
        p.add_argument("--json", action="store_true", help="print the API's JSON")
        add_client_flags(p)
    env.set_defaults(func=cmd_env)
