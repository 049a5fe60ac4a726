"""``vigil secret``: a tenant's secrets (through the gateway) and the operator's keys.

``set``, ``list`` and ``rm`` talk to the gateway as an operator of the token's tenant; a
value is read from stdin (a prompt without echo on a terminal) or ``--from-file``, never
from the command line, so it stays out of shell history and ``ps``. ``keygen`` prints a
new key line; ``rotate`` talks to NATS directly as the operator and re-seals every
tenant's secrets with the current key (see :mod:`vigil.secrets` for the key file).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from nats.js import JetStreamContext

from vigil import replay
from vigil.api import SecretInfo
from vigil.cli_config import DEFAULT_DATA_DIR, add_client_flags, environ, open_client
from vigil.cli_output import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    EXIT_UNREACHABLE,
    age,
    exit_epilog,
    out_json,
    table,
)
from vigil.cli_replay import CONNECTION
from vigil.errors import VigilError
from vigil.messages import ID_PATTERN, ID_RE
from vigil.progress import render_progress
from vigil.secrets import (
    MAX_VALUE_BYTES,
    Keyring,
    Rotation,
    SecretStore,
    new_key_line,
    rotate,
)

KEY_FILE = "secrets.key"  # in a `vigil up` data directory

KEYS_HELP = """\
the operator's keys (used by `rotate`; the gateway and executors have their own settings):
  --key-file PATH           a file of `id:base64-key` lines, the first one seals
  VIGIL_SECRETS_KEY_FILE    the same, or VIGIL_SECRETS_KEY holding the text itself
  DIR/secrets.key           the one `vigil up` made (--data-dir DIR, $VIGIL_DATA_DIR, .vigil)

rotating the key:
  1. vigil secret keygen --id k2        and put its line FIRST in the key file (keep k1)
  2. restart the gateway and the executors (they now seal with k2, and open k1 and k2)
  3. vigil secret rotate --yes          re-seals every tenant's secrets with k2
  4. `vigil secret rotate` (a dry run) now finds nothing to re-seal: drop the k1 line,
     and restart them again"""


def _name(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a secret name ({ID_PATTERN[1:-1]}: letters, digits, _ or -)")
    return value


def read_value(args: argparse.Namespace) -> str:
    """The value to set: ``--from-file`` (as it is), else stdin (one trailing newline
    dropped: ``echo`` adds it), else a prompt without echo when stdin is a terminal."""
    if args.from_file:
        try:
            data = Path(args.from_file).read_bytes()
        except OSError as exc:
            raise VigilError(f"cannot read {args.from_file}: {exc.strerror}") from None
        source = args.from_file
    elif sys.stdin.isatty():
        first = getpass.getpass(f"value of secret {args.name} (not shown): ")
        if getpass.getpass("again, to confirm: ") != first:
            raise VigilError("the two values differ; nothing was set")
        data, source = first.encode(), "the prompt"
    else:
        data = sys.stdin.buffer.read()
        data = data.removesuffix(b"\n").removesuffix(b"\r")
        source = "stdin"
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError:
        raise VigilError(f"the value from {source} is not UTF-8 text; encode binary values "
                         "(e.g. base64) and decode them in the agent") from None
    if not value:
        raise VigilError(f"the value from {source} is empty; nothing was set")
    if "\x00" in value:
        raise VigilError(f"the value from {source} holds a NUL byte, which no environment "
                         "variable can; encode it (e.g. base64)")
    if len(data) > MAX_VALUE_BYTES:
        raise VigilError(f"the value from {source} is {len(data)} bytes; at most "
                         f"{MAX_VALUE_BYTES}")
    return value


def render(secrets: list[SecretInfo]) -> list[str]:
    rows = [(s.name, str(s.size), s.key_id, age(s.updated_at), age(s.created_at))
            for s in secrets]
    return table(("NAME", "BYTES", "KEY", "UPDATED", "CREATED"), rows,
                 right=frozenset({1}))


async def cmd_set(args: argparse.Namespace) -> int:
    value = read_value(args)
    async with open_client(args) as client:
        info = await client.set_secret(args.name, value)
    if args.json:
        print(out_json(info))
    else:
        print(f"secret {info.name} set ({info.size} bytes, sealed with key {info.key_id}); "
              f"tasks name it as \"secrets\": {{\"ENV_NAME\": \"{info.name}\"}}")
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        found = await client.secrets()
    if args.json:
        print(out_json(found))
        return EXIT_OK
    if not found.secrets:
        print("no secrets in this tenant (set one: `vigil secret set NAME`)", file=sys.stderr)
        return EXIT_OK
    for line in render(found.secrets):
        print(line)
    return EXIT_OK


async def cmd_rm(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        # With --json, what was removed: its metadata, read first (the delete answers 204).
        gone = await client.secret(args.name) if args.json else None
        await client.delete_secret(args.name)
    if gone is not None:
        print(out_json(gone))
    else:
        print(f"secret {args.name} removed; tasks that name it now fail at their start")
    return EXIT_OK


async def cmd_keygen(args: argparse.Namespace) -> int:
    print(new_key_line(args.id))
    print("(a new key: put this line FIRST in the key file to make it the one that seals, "
          "keep the older lines until `vigil secret rotate --yes` has run; see "
          "`vigil secret rotate --help`)", file=sys.stderr)
    return EXIT_OK


def operator_keyring(args: argparse.Namespace) -> Keyring:
    """``--key-file``, else VIGIL_SECRETS_KEY_FILE / VIGIL_SECRETS_KEY, else the key file of
    the `vigil up` data directory."""
    env = environ()
    if args.key_file:
        found = Keyring.load(key_file=args.key_file)
    else:
        found = Keyring.load(env.get("VIGIL_SECRETS_KEY_FILE", ""),
                             env.get("VIGIL_SECRETS_KEY", ""))
        if found is None:
            path = Path(getattr(args, "data_dir", None) or env.get("VIGIL_DATA_DIR")
                        or DEFAULT_DATA_DIR)
            if (path / KEY_FILE).exists():
                found = Keyring.load(key_file=str(path / KEY_FILE))
    if found is None:
        raise VigilError("no secrets key: pass --key-file (the file the gateway and executors "
                         "use), or set VIGIL_SECRETS_KEY_FILE / VIGIL_SECRETS_KEY")
    return found


@contextlib.asynccontextmanager
async def _nats(args: argparse.Namespace) -> AsyncIterator[JetStreamContext]:
    nc = await replay.operator_connect(replay.operator_url(
        args.nats_url, getattr(args, "data_dir", None), environ()))
    try:
        yield nc.jetstream(timeout=5.0)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def cmd_rotate(args: argparse.Namespace) -> int:
    keyring = operator_keyring(args)
    err = sys.stderr
    started = [0.0]

    def progress(done: Rotation) -> None:
        if not started[0]:
            started[0] = time.monotonic()
        if err.isatty():
            seen = done.current + done.resealed + len(done.failed)
            err.write("\r" + render_progress("re-sealing", seen, done.total,
                                             time.monotonic() - started[0]))
            err.flush()

    async with _nats(args) as js:
        done = await rotate(SecretStore(js), keyring, dry_run=not args.yes,
                            on_progress=progress)
    if err.isatty() and done.total:
        err.write("\n")
    code = EXIT_TASK_FAILED if done.failed else EXIT_OK
    if args.json:
        print(out_json({"key_id": keyring.current_id, "dry_run": not args.yes,
                        "total": done.total, "resealed": done.resealed,
                        "current": done.current, "failed": done.failed}))
        return code
    verb = "re-sealed" if args.yes else "would re-seal"
    print(f"{done.total} secrets: {done.resealed} {verb} with key {keyring.current_id}, "
          f"{done.current} sealed with it already, {len(done.failed)} failed")
    for failure in done.failed:
        print(f"  failed: {failure}", file=err)
    if not args.yes and done.resealed:
        print("(a dry run: nothing was written; run again with --yes)", file=err)
    return code


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``secret`` to the ``vigil`` parser."""
    sec = sub.add_parser(
        "secret", help="set, list, remove a tenant's secrets; rotate the operator's key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Secrets by reference: a task names its tenant's secrets in its spec,\n"
        "  \"secrets\": {\"ANTHROPIC_API_KEY\": \"llm-key\"}\n"
        "and its agent gets each value as $ANTHROPIC_API_KEY and as the file\n"
        "/run/secrets/ANTHROPIC_API_KEY. Values are sealed (AES-256-GCM, the operator's key)\n"
        "before NATS stores them, never shown again, and masked (***) in the task's output.\n"
        "set/list/rm need an operator token of the tenant.",
        epilog="""examples:
  vigil secret set llm-key                  (prompts without echo)
  printf %s "$KEY" | vigil secret set llm-key
  vigil secret set tls-key --from-file key.pem
  vigil secret list
  vigil secret rm llm-key
  vigil submit --wait -f task.yaml          (with secrets: {ANTHROPIC_API_KEY: llm-key})

""" + KEYS_HELP + "\n\n" + exit_epilog(
            (EXIT_OK, "done"),
            (EXIT_TASK_FAILED, "rm: no such secret, rotate: a secret could not be opened"),
            (EXIT_UNREACHABLE, "no gateway (rotate: no NATS)")))
    add_client_flags(sec)  # also before the action: `vigil secret --data-dir D set NAME`
    actions = sec.add_subparsers(dest="secret_command", metavar="ACTION", required=True)

    st = actions.add_parser(
        "set", help="create or replace a secret (value from stdin or --from-file)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Create or replace the tenant's secret NAME. The value is read from\n"
        "--from-file (exactly as it is), else from stdin (one trailing newline dropped),\n"
        "with a prompt that does not echo when stdin is a terminal; never from the command\n"
        f"line. At most {MAX_VALUE_BYTES} bytes of UTF-8 text, no NUL byte.",
        epilog="examples:\n  vigil secret set llm-key\n  vigil secret set llm-key < key.txt\n"
        "  vigil secret set tls-key --from-file key.pem")
    st.add_argument("name", type=_name, metavar="NAME")
    st.add_argument("--from-file", metavar="PATH", help="read the value from this file")
    st.add_argument("--json", action="store_true", help="print the secret's metadata as JSON")
    add_client_flags(st)
    st.set_defaults(func=cmd_set)

    ls = actions.add_parser(
        "list", help="the tenant's secrets: NAME, BYTES, KEY, UPDATED (never values)",
        description="List the tenant's secrets with their size, the key that sealed them "
        "and when they were set. Values are never shown.")
    ls.add_argument("--json", action="store_true",
                    help='print {"secrets": [{name, size, key_id, created_at, updated_at}]}')
    add_client_flags(ls)
    ls.set_defaults(func=cmd_list)

    rm = actions.add_parser("rm", help="remove a secret",
                            description="Remove the tenant's secret NAME. Tasks that name it "
                            "afterwards fail at their start (saying so).")
    rm.add_argument("name", type=_name, metavar="NAME")
    rm.add_argument("--json", action="store_true",
                    help="print the removed secret's metadata as JSON")
    add_client_flags(rm)
    rm.set_defaults(func=cmd_rm)

    kg = actions.add_parser(
        "keygen", help="print a new key line (id:base64 of 32 random bytes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print a new AES-256 key as a key-file line. Nothing is stored.",
        epilog=KEYS_HELP)
    kg.add_argument("--id", default="k1", help="the key's id (default k1)")
    kg.set_defaults(func=cmd_keygen)

    rt = actions.add_parser(
        "rotate", help="re-seal every tenant's secrets with the current key (operator)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-seal every secret of every tenant that is not sealed with the\n"
        "current key (the first line of the key file), talking to NATS directly as the\n"
        "operator user. A dry run unless --yes; running it again changes nothing more. A\n"
        "secret set meanwhile is never overwritten (compare-and-set). Exit status 1 if\n"
        "any secret could not be opened (it is named, and left as it is).",
        epilog=KEYS_HELP + "\n\n" + CONNECTION)
    rt.add_argument("--yes", action="store_true", help="write (without it: count only)")
    rt.add_argument("--json", action="store_true", help="print {key_id, dry_run, total, "
                    "resealed, current, failed} as JSON")
    rt.add_argument("--key-file", metavar="PATH", help="the key file (see below)")
    rt.add_argument("--nats-url", metavar="URL", help="NATS with the operator's credentials")
    rt.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                    help="a `vigil up` data directory")
    rt.set_defaults(func=cmd_rotate)
