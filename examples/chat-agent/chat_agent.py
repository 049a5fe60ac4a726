"""An example coding agent on Vigil: it asks an OpenAI-compatible chat model for files and
writes them into its workspace, one turn at a time, checkpointing after each.

It shows the pieces a real agent needs:

- the model's address comes from ``OPENAI_BASE_URL`` and is reached through the executor's
  egress proxy (``HTTPS_PROXY``, which urllib honours), so the task must allow that host;
- the API key is a secret by reference: ``$OPENAI_API_KEY`` or ``/run/secrets/OPENAI_API_KEY``;
- its conversation lives in the workspace (``.agent/state.json``) and every turn ends in a
  checkpoint, so a task whose node dies resumes at the turn it had reached;
- when the model cannot be reached it confesses, with a hint, instead of failing silently.

Settings (environment): ``CHAT_GOAL`` what to build (required), ``CHAT_MODEL`` (default
``gpt-4o-mini``), ``CHAT_MAX_TURNS`` (default 4), ``CHAT_RETRIES`` (default 3),
``CHAT_TIMEOUT_S`` (default 60), ``CHAT_CA_PEM`` an extra CA to trust, in PEM (for a
private endpoint). Exit codes: 0 done, 2 bad settings, 3 model unreachable, 4 refused
credentials, 5 the goal not met in ``CHAT_MAX_TURNS`` turns.
"""

from __future__ import annotations

import json
import os
import posixpath
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import vigil_agent as vigil

STATE = ".agent/state.json"
SYSTEM = (
    "You are a coding agent working in an empty directory. Answer every message with one "
    'JSON object: {"files": {"relative/path": "file content", ...}, "done": true|false, '
    '"summary": "what you did"}. Write whole files. Set done when the goal is met.'
)


class Unreachable(Exception):
    """The model could not be reached (network, proxy refusal, its 5xx, a timeout)."""


class Refused(Exception):
    """The model answered 401/403: the key is wrong or lacks access."""


def setting(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None or not value.strip():
        print(f"{name} is not set", file=sys.stderr)
        sys.exit(2)
    return value


def api_key() -> str:
    try:
        with open("/run/secrets/OPENAI_API_KEY", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return setting("OPENAI_API_KEY")


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    pem = os.environ.get("CHAT_CA_PEM")
    if pem:
        context.load_verify_locations(cadata=pem)
    return context


def ask(messages: list[dict[str, str]]) -> str:
    """One chat completion; the reply's text."""
    base = setting("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
    body = json.dumps({
        "model": setting("CHAT_MODEL", "gpt-4o-mini"),
        "messages": messages,
        "response_format": {"type": "json_object"},
    }).encode()
    request = urllib.request.Request(  # noqa: S310 - the URL is the operator's setting
        f"{base}/chat/completions", data=body, method="POST",
        headers={"Authorization": f"Bearer {api_key()}", "Content-Type": "application/json"},
    )
    timeout = float(setting("CHAT_TIMEOUT_S", "60"))
    try:
        with urllib.request.urlopen(request, timeout=timeout,  # noqa: S310
                                    context=tls_context()) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.headers.get("X-Vigil-Egress"):  # the platform's proxy, not the model
            reason = exc.read().decode(errors="replace").strip()
            raise Unreachable(f"{base}: {reason or f'HTTP {exc.code} from the proxy'}") from exc
        if exc.code in (401, 403):
            raise Refused(f"HTTP {exc.code} from {base}") from exc
        raise Unreachable(f"HTTP {exc.code} from {base}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unreachable(f"{base}: {getattr(exc, 'reason', exc)}") from exc
    return str(answer["choices"][0]["message"]["content"])


def ask_with_retries(messages: list[dict[str, str]]) -> str:
    retries = int(setting("CHAT_RETRIES", "3"))
    for attempt in range(retries + 1):
        try:
            return ask(messages)
        except Unreachable as exc:
            if attempt == retries:
                raise
            delay = 2.0 ** attempt
            print(f"model unreachable ({exc}); retrying in {delay:.0f}s", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def parse_reply(text: str) -> dict[str, Any] | None:
    """The reply's JSON object; None when it is not one (the model is asked again)."""
    start, end = text.find("{"), text.rfind("}")
    try:
        reply = json.loads(text[start:end + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        return None
    if not isinstance(reply, dict) or not isinstance(reply.get("files", {}), dict):
        return None
    return reply


def inside(root: str, path: str) -> str | None:
    """``path`` under ``root``, or None when it would leave it (or names the agent's state)."""
    clean = posixpath.normpath("/" + path).lstrip("/")
    if not clean or clean.startswith(".agent"):
        return None
    return os.path.join(root, clean)


def write_files(root: str, files: dict[str, Any]) -> list[str]:
    written = []
    for name, content in files.items():
        target = inside(root, str(name))
        if target is None or not isinstance(content, str):
            print(f"skipping {name!r}: not a file under the workspace", flush=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(content)
        written.append(os.path.relpath(target, root))
    return written


def load_state(root: str) -> dict[str, Any]:
    try:
        with open(os.path.join(root, STATE), encoding="utf-8") as fh:
            state: dict[str, Any] = json.load(fh)
            return state
    except FileNotFoundError:
        goal = setting("CHAT_GOAL")
        return {"turn": 0, "done": False, "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": goal}]}


def save_state(root: str, state: dict[str, Any]) -> None:
    """Write the state whole or not at all: a checkpoint never holds half a file."""
    path = os.path.join(root, STATE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main() -> int:
    root = vigil.workspace()
    state = load_state(root)
    max_turns = int(setting("CHAT_MAX_TURNS", "4"))
    if state["turn"]:
        print(f"resuming at turn {state['turn'] + 1} (attempt {vigil.attempt()})", flush=True)
    base = setting("OPENAI_BASE_URL", "https://api.openai.com/v1")
    while not state["done"] and state["turn"] < max_turns:
        turn = state["turn"] + 1
        vigil.progress(step=turn, of=max_turns, message="asking the model")
        try:
            text = ask_with_retries(state["messages"])
        except Unreachable as exc:
            print(f"error: cannot reach the model: {exc}", file=sys.stderr, flush=True)
            vigil.confess(
                f"cannot reach the model: {exc}", "error", category="model_unreachable",
                hint=f"check that the task's egress allows the host of {base} and that the "
                "endpoint is up; a proxy refusal shows as an egress event on the task",
            )
            return 3
        except Refused as exc:
            print(f"error: the model refused the API key: {exc}", file=sys.stderr, flush=True)
            vigil.confess(f"the model refused the API key: {exc}", "error",
                          category="credentials",
                          hint="update the secret: vigil secret set <name>")
            return 4
        state["messages"].append({"role": "assistant", "content": text})
        reply = parse_reply(text)
        if reply is None:
            state["messages"].append({"role": "user", "content":
                                      "That was not one JSON object as asked. Try again."})
        else:
            written = write_files(root, reply.get("files", {}))
            print(f"turn {turn}: wrote {', '.join(written) or 'nothing'}; "
                  f"{reply.get('summary', '')}", flush=True)
            state["done"] = bool(reply.get("done"))
            if not state["done"]:
                state["messages"].append({"role": "user", "content": "Continue."})
        state["turn"] = turn
        save_state(root, state)
        if not vigil.checkpoint(note={"turn": turn}):
            print("checkpoint not confirmed; continuing", flush=True)
    if not state["done"]:
        vigil.confess(f"the goal was not met in {max_turns} turns", "warning", category="loop",
                      hint="raise CHAT_MAX_TURNS or make CHAT_GOAL smaller")
        return 5
    print(f"done in {state['turn']} turn(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
