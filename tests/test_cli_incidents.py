"""`vigil incidents` as a user runs it (a subprocess of .venv/bin/vigil) against a real
gateway and auditor on a real nats-server: the table, the filters, `show`, `ack`,
`resolve`, `--json` for scripts, and the exit codes when something is refused or missing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import CliResult, Platform, eventually, run_vigil
from vigil import auth, subjects
from vigil.cli_output import EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE

pytestmark = pytest.mark.integration

REGISTRY = "cannot reach registry mirror <n>"
QUOTA = "quota exceeded for bucket <n>"


@dataclass
class Cli:
    url: str
    home: Path

    async def __call__(self, token: str, *argv: str, timeout: float = 60.0) -> CliResult:
        """Run ``vigil ARGV`` as the holder of ``token``, in a home of its own (no stray
        config file or client.json is read)."""
        return await run_vigil(self.home, self.url, token, *argv, timeout=timeout)


async def test_incidents_list_show_ack_resolve_and_json(platform: Platform,
                                                        tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    operator = auth.add_token(tokens, "op", "acme", "operator")
    viewer = auth.add_token(tokens, "va", "acme", "viewer")
    await platform.auditor()
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(f"http://127.0.0.1:{gw.http_port}", home)

    async def confess(n: int, summary: str, severity: str) -> None:
        body = {"id": f"cli-{n}", "summary": summary, "severity": severity,
                "category": "network", "task_id": f"job-{n}", "tenant": "acme"}
        await platform.js.publish(subjects.issue("agent", severity), json.dumps(body).encode())

    for n in range(12):  # more tasks than `show` lists
        await confess(n, f"cannot reach registry mirror {n}", "error")
    await confess(99, "quota exceeded for bucket 7", "warning")

    async def listed() -> list[dict] | None:
        run = await cli(operator, "incidents", "--json")
        assert run.code == EXIT_OK, run.err
        found: list[dict] = run.json()
        return found if sorted(i["count"] for i in found) == [1, 12] else None

    found = await eventually(listed, timeout=30, what="two incidents counting 12 and 1")
    by_title = {i["title"]: i for i in found}
    registry, quota = by_title[REGISTRY]["id"], by_title[QUOTA]["id"]

    # The table: a header and one line per incident, most recently seen first.
    table = await cli(viewer, "incidents")
    assert table.code == EXIT_OK, table.err
    header, *rows = table.out.splitlines()
    assert header.split() == ["ID", "SEVERITY", "STATUS", "COUNT", "LAST", "SEEN", "TITLE"]
    assert [r.split()[0] for r in rows] == [quota, registry]
    assert rows[1].split()[1:4] == ["critical", "open", "12"]  # 10 errors escalated it
    assert rows[1].endswith(f"agent: {REGISTRY}")

    # Filters reach the gateway.
    warning = await cli(viewer, "incidents", "--severity", "warning", "--json")
    assert [i["id"] for i in warning.json()] == [quota]
    tenant = await cli(operator, "incidents", "--tenant", "acme", "--status", "open", "--json")
    assert sorted(i["id"] for i in tenant.json()) == sorted([quota, registry])
    none = await cli(viewer, "incidents", "--status", "resolved")
    assert none.code == EXIT_OK and none.out.strip() == "no incidents"
    # Another tenant's name is refused the same way whether that tenant exists or not.
    for other in ("globex", "no-such-tenant"):
        refused = await cli(viewer, "incidents", "--tenant", other, "--json")
        assert refused.code == EXIT_USAGE and "your token is for tenant 'acme'" in refused.err

    # show: readable, and --json for scripts.
    shown = await cli(viewer, "incidents", "show", registry)
    assert shown.code == EXIT_OK, shown.err
    fields = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1]
              for line in shown.out.splitlines() if line.strip() and
              not line.lstrip().startswith("sample")}
    assert fields["id"] == registry and fields["title"] == REGISTRY
    assert fields["severity"] == "critical" and fields["count"] == "12"
    assert fields["tenants"] == "acme"
    assert fields["tasks"].startswith("job-0, job-1, ") and fields["tasks"].endswith("(12 in all)")
    samples = [line for line in shown.out.splitlines() if line.lstrip().startswith("sample")]
    assert len(samples) == 5 and "job-0" in samples[0]
    as_json = await cli(viewer, "incidents", "show", registry, "--json")
    detail = as_json.json()
    assert detail["id"] == registry and detail["count"] == 12
    assert detail["tasks"] == [f"job-{n}" for n in range(12)]
    assert "tasks_total" not in detail  # a viewer's view is narrowed to its tenant

    # ack and resolve: an operator's; a viewer is refused.
    refused = await cli(viewer, "incidents", "ack", registry)
    assert refused.code == EXIT_USAGE and "operator" in refused.err
    acked = await cli(operator, "incidents", "ack", registry)
    assert acked.code == EXIT_OK, acked.err
    # The gateway waits (5 s) for the auditor to apply it; on a loaded machine it may
    # answer 202 "recorded, not applied yet" instead, and the CLI says so.
    assert acked.out.strip() == f"incident {registry} is now acknowledged" or \
        acked.out.startswith(f"incident {registry}: ack recorded; the auditor has not"), \
        acked.out
    await applied(cli, viewer, registry, "acknowledged")
    assert [i["id"] for i in (await cli(viewer, "incidents", "--status", "acknowledged",
                                        "--json")).json()] == [registry]
    resolved = await cli(operator, "incidents", "resolve", registry, "--json")
    assert resolved.code == EXIT_OK, resolved.err
    assert resolved.json()["id"] == registry
    detail = await applied(cli, viewer, registry, "resolved")
    assert detail["resolved_by"] == "op" and detail["acknowledged_by"] == "op"
    shown = await cli(operator, "incidents", "show", registry)
    assert "resolved_by  op" in shown.out and "acknowledged_by  op" in shown.out

    # Mistakes say what is wrong, with the documented exit codes.
    missing = await cli(viewer, "incidents", "show", "inc_nope")
    assert missing.code == EXIT_TASK_FAILED and "inc_nope" in missing.err
    no_id = await cli(viewer, "incidents", "show")
    assert no_id.code == EXIT_USAGE and "needs an incident id" in no_id.err
    bad = await cli(viewer, "incidents", "--severity", "bogus")
    assert bad.code == EXIT_USAGE and "invalid choice" in bad.err


async def applied(cli: Cli, token: str, incident_id: str, status: str) -> dict:
    async def shown() -> dict | None:
        run = await cli(token, "incidents", "show", incident_id, "--json")
        assert run.code == EXIT_OK, run.err
        data: dict = run.json()
        return data if data["status"] == status else None

    return await eventually(shown, timeout=30, what=f"{incident_id} to be {status}")
