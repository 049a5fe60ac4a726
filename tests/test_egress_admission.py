"""A tenant's egress default and maximum, through the gateway's door: a rule beyond the
maximum is a 422 naming its field, whoever refused it (here the scheduler, which alone
knows the tenant's limits)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support import Platform
from vigil import auth

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(platform: Platform, tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, str],
                                                                       aiohttp.ClientSession]]:
    tokens = tmp_path / "tokens.json"
    headers = {"Authorization": f"Bearer {auth.add_token(tokens, 's', 'acme', 'submitter')}"}
    await platform.scheduler(egress_default="pypi.org", tenant_limits=json.dumps({"acme": {
        "egress_default": ["files.example.com:443"], "egress_max": ["*.example.com"]}}))
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    async with aiohttp.ClientSession() as http:
        yield f"http://127.0.0.1:{gw.http_port}", headers, http


async def submit(api: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    url, headers, http = api
    async with http.post(f"{url}/v1/tasks", json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_a_rule_beyond_the_tenant_s_maximum_is_a_422_naming_the_field(
    api: Any, platform: Platform
) -> None:
    status, body = await submit(api, {"id": "too-wide", "command": ["true"], "egress": {
        "allow": ["api.example.com", "db.internal:5432"]}})
    assert status == 422, body
    error = body["error"]
    assert (error["code"], error["field"]) == ("rejected", "$.egress.allow[1]")
    assert "'db.internal:5432' is not within tenant 'acme''s egress maximum " \
        "['*.example.com']" in error["message"]
    state = await platform.state("too-wide", "acme")
    assert state is not None and state.status == "failed" and state.attempt == 0
    # The proxy variables are the platform's when the task has egress (its default too).
    status, body = await submit(api, {"command": ["true"], "env": {"HTTPS_PROXY": "http://x"}})
    assert (status, body["error"]["field"]) == (422, "$.env.HTTPS_PROXY"), body
    # A refused id may be submitted again, fixed.
    status, body = await submit(api, {"id": "too-wide", "command": ["true"],
                                      "egress": {"allow": ["api.example.com:443"]}})
    assert status == 202, body


async def test_the_tenant_s_default_applies_when_the_task_names_no_egress(
    api: Any, platform: Platform
) -> None:
    status, body = await submit(api, {"id": "defaulted", "command": ["true"]})
    assert status == 202, body
    state = await platform.state("defaulted", "acme")
    assert state is not None and state.spec is not None and state.spec.egress is not None
    assert state.spec.egress.allow == ["files.example.com:443"]
    status, body = await submit(api, {"id": "none", "command": ["true"], "egress": {"allow": []}})
    assert status == 202, body
    state = await platform.state("none", "acme")
    assert state is not None and state.spec is not None and state.spec.egress is not None
    assert state.spec.egress.allow == []  # an explicit "no way out" stays so
