"""The architecture's rule, enforced: no service imports another; shared imports none."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "vigil": ROOT / "shared" / "src" / "vigil",
    "vigil_scheduler": ROOT / "services" / "scheduler" / "src" / "vigil_scheduler",
    "vigil_executor": ROOT / "services" / "executor" / "src" / "vigil_executor",
    "vigil_auditor": ROOT / "services" / "auditor" / "src" / "vigil_auditor",
    "vigil_gateway": ROOT / "services" / "gateway" / "src" / "vigil_gateway",
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_stay_inside_their_layer(package: str) -> None:
    allowed = {package, "vigil"}
    offenders = []
    # A member's own unit tests (services/<name>/tests, shared/tests) obey the rule too.
    tests = PACKAGES[package].parent.parent / "tests"
    paths = [*PACKAGES[package].rglob("*.py"), *tests.rglob("*.py")]
    for path in paths:
        bad = {p for p in imported_packages(path) if p in PACKAGES and p not in allowed}
        offenders += [f"{path.relative_to(ROOT)} imports {p}" for p in sorted(bad)]
    assert not offenders, offenders


def test_services_spell_no_subjects() -> None:
    """Subjects are declared once in vigil.subjects, never written out in a service."""
    offenders = []
    for package, root in PACKAGES.items():
        if package == "vigil":
            continue
        for path in root.rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for literal in ('"vigil.submit', '"vigil.work', '"vigil.events', '"vigil.issues',
                            '"vigil-tasks', "f\"vigil."):
                if literal in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {literal}")
    assert not offenders, offenders


def test_settings_doc_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_settings_doc.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "settings.md").read_text() == gen.render(), (
        "docs/settings.md is stale: run .venv/bin/python scripts/gen_settings_doc.py")


def test_compose_nats_config_is_current() -> None:
    """deploy/compose/nats.conf is `vigil nats-config` output: a new permission (or user)
    must reach it, or services deployed with compose hit permissions violations."""
    import contextlib
    import io

    from vigil.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["nats-config"])
    assert (ROOT / "deploy" / "compose" / "nats.conf").read_text() == out.getvalue(), (
        "deploy/compose/nats.conf is stale: .venv/bin/vigil nats-config > "
        "deploy/compose/nats.conf")
    env = (ROOT / "deploy" / "compose" / "env.example").read_text()
    for user in re.findall(r"\$(VIGIL_[A-Z_]+_PASSWORD)", out.getvalue()):
        assert f"{user}=" in env, f"{user} missing from deploy/compose/env.example"
