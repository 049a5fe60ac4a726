"""The README's example agent (examples/chat-agent), run from the README's words: `vigil up`
with the operator's loopback allowance, the API key as a secret, a task allowed to reach the
fake chat endpoint the test starts on this host, and nothing else."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_up import VIGIL, free_ports, run_cli, wait_for_line

from support import eventually_sync

pytestmark = [pytest.mark.e2e, pytest.mark.podman, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "examples" / "chat-agent" / "fake_chat_server.py"
AGENT = "/opt/vigil/examples/chat_agent.py"
KEY = "sk-test-5f1c9e0b7d"


def host_address() -> tuple[str, str]:
    """This machine's name and the address it resolves to (a loopback one on Debian's
    default /etc/hosts): a name the agent's proxy settings do not exempt, as `localhost` is."""
    name = socket.gethostname()
    return name, socket.gethostbyname(name)


@pytest.fixture
def fake_chat(tmp_path: Path) -> Iterator[tuple[str, int]]:
    name, address = host_address()
    port = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "--host", address, "--port", str(port), "--key", KEY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(proc, "fake chat endpoint on", [], timeout=10)
        yield name, port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture
def stack(tmp_path: Path, agent_image: str) -> Iterator[Path]:
    """`vigil up` as the README starts it for the example, with loopback allowed."""
    _, address = host_address()
    data = tmp_path / "stack"
    proc = subprocess.Popen(
        [VIGIL, "up", "--data-dir", str(data), "--http-port", str(free_ports(4)),
         "--nats-port", str(free_ports(1))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "VIGIL_EGRESS_ALLOW_CIDRS": f"{address}/32"},
    )
    seen: list[str] = []
    try:
        wait_for_line(proc, "Submit more tasks", seen, timeout=120)
        yield data
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out


def secret_set(data: Path, name: str, value: str) -> None:
    done = subprocess.run([VIGIL, "secret", "--data-dir", str(data), "set", name],
                          input=value, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def chat_task(data: Path, host: str, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "submit", "--wait", "--json", "--egress", f"{host}:{port}",
        "--secret", "OPENAI_API_KEY=llm-key",
        "--env", f"OPENAI_BASE_URL=http://{host}:{port}/v1",
        "--env", "CHAT_GOAL=write fib.py that prints the 10th Fibonacci number",
        *extra, "--", "python3", AGENT, data_dir=data)


def test_the_example_agent_talks_to_its_model_through_the_proxy(
        stack: Path, fake_chat: tuple[str, int]) -> None:
    host, port = fake_chat
    secret_set(stack, "llm-key", KEY)

    done = chat_task(stack, host, port)
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads(done.stdout)
    assert state["status"] == "succeeded", state
    logs = run_cli("logs", state["id"], data_dir=stack).stdout
    assert "turn 1: wrote fib.py" in logs and "turn 2: wrote README.md" in logs, logs
    assert "done in 2 turn(s)" in logs
    assert KEY not in logs
    # Each turn ended in a checkpoint: a node lost after turn 1 resumes at turn 2.
    # (A succeeded task's checkpoints are dropped; its history names the last one saved.)
    assert state["history"][-1].get("saved"), state["history"]

    # The model is down: the agent says so (a confession with a hint), then fails.
    silent = free_ports(1)
    down = chat_task(stack, host, silent, "--env", "CHAT_RETRIES=0", "--max-attempts", "1")
    assert json.loads(down.stdout)["status"] == "failed", down.stdout

    def confessed() -> str | None:
        out = run_cli("incidents", data_dir=stack).stdout
        return out if "cannot reach the model" in out else None

    eventually_sync(confessed, timeout=20, what="the agent's model_unreachable incident")

    # The model's host is not on the task's list: the proxy refuses (an egress event, the
    # platform's confession) and the agent tells the proxy's 403 from a refused key.
    refused = run_cli(
        "submit", "--wait", "--json", "--egress", "api.example.com", "--max-attempts", "1",
        "--secret", "OPENAI_API_KEY=llm-key", "--env", "CHAT_RETRIES=0",
        "--env", f"OPENAI_BASE_URL=http://{host}:{port}/v1", "--env", "CHAT_GOAL=x",
        "--", "python3", AGENT, data_dir=stack)
    state = json.loads(refused.stdout)
    assert state["status"] == "failed" and state["exit_code"] == 3, state
    logs = run_cli("logs", state["id"], data_dir=stack).stdout
    assert "cannot reach the model" in logs and "not on the task's egress list" in logs, logs
