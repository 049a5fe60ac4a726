"""The architecture's rule, enforced: no service imports another; shared imports none."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

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


MAX_EXECUTOR_MODULE_LINES = 450


def test_executor_modules_stay_small() -> None:
    """One module per concept: the attempt was once a single module of 1,490 lines that
    claimed, ran, restored, checkpointed and recorded (issue #13). Counted as ``wc -l``."""
    long = {path.name: lines for path in sorted(PACKAGES["vigil_executor"].rglob("*.py"))
            if (lines := path.read_text(encoding="utf-8").count("\n"))
            > MAX_EXECUTOR_MODULE_LINES}
    assert not long, f"split these by concept (at most {MAX_EXECUTOR_MODULE_LINES} lines): {long}"


def imports_module(path: Path, package: str, module: str) -> bool:
    """Whether ``path`` (a module of ``package``) imports ``package.module`` anywhere:
    at the top, in a function, or under ``if TYPE_CHECKING``; absolute or relative."""
    target = f"{package}.{module}"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            if any(a.name == target or a.name.startswith(f"{target}.") for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .service import X, from . import service
                base = package if not base else f"{package}.{base}"
            if base == target or base.startswith(f"{target}."):
                return True
            if base == package and any(a.name == module for a in node.names):
                return True
    return False


def test_only_the_entry_points_know_the_executor() -> None:
    """Attempts see the executor through an AttemptContext, not the whole Executor: no
    module of vigil_executor but service and __main__ imports vigil_executor.service,
    not even for type checking (that was an import cycle)."""
    offenders = [str(path.relative_to(ROOT))
                 for path in sorted(PACKAGES["vigil_executor"].rglob("*.py"))
                 if path.name not in ("service.py", "__main__.py")
                 and imports_module(path, "vigil_executor", "service")]
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


def settings_doc_generator() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_settings_doc.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_settings_doc_is_current() -> None:
    gen = settings_doc_generator()
    assert (ROOT / "docs" / "settings.md").read_text() == gen.render(), (
        "docs/settings.md is stale: run .venv/bin/python scripts/gen_settings_doc.py")


def test_every_setting_says_what_it_means() -> None:
    from vigil.settings import describe

    gen = settings_doc_generator()
    undocumented = [f"{service}: {var}" for service, cls in gen.SERVICES
                    for var, _, _, doc in describe(cls) if not doc.strip()]
    assert not undocumented, (f"settings without a docstring (their meaning in "
                              f"docs/settings.md): {undocumented}")


def test_every_variable_of_the_scripts_and_cli_is_documented() -> None:
    """A VIGIL_* that a setup script or the `vigil` CLI reads is in docs/settings.md."""
    from vigil import topology
    from vigil.settings import describe

    gen = settings_doc_generator()
    known = {var for var, *_ in gen.TOOLS}
    known |= {var for _, cls in gen.SERVICES for var, *_ in describe(cls)}
    read: dict[str, str] = {}
    for path in [*(ROOT / "scripts").glob("*.sh"), ROOT / "dev"]:
        text = path.read_text(encoding="utf-8")
        assigned = set(re.findall(r"^\s*(VIGIL_[A-Z_]+)=\"\$\(", text, re.MULTILINE))
        for var in re.findall(r"\$\{?(VIGIL_[A-Z_]+)", text):
            if var not in assigned and var != "VIGIL_ROOT":  # lib.sh's own, not a setting
                read.setdefault(var, str(path.relative_to(ROOT)))
    for path in (ROOT / "shared" / "src" / "vigil").glob("*.py"):
        if path.name.startswith("cli") or path.name in ("replay.py", "embedded.py"):
            for var in re.findall(r"[\"'](VIGIL_[A-Z_]+)[\"']",
                                  path.read_text(encoding="utf-8")):
                read.setdefault(var, str(path.relative_to(ROOT)))
    stream_names = {s.name for s in topology.STREAMS}  # replay's names, not variables
    missing = {var: where for var, where in read.items()
               if var not in known and var not in stream_names}
    assert not missing, f"add these to TOOLS in scripts/gen_settings_doc.py: {missing}"
    assert {"VIGIL_CACHE", "VIGIL_PODMAN_USER", "VIGIL_AGENT_IMAGE", "VIGIL_DATA_DIR"} <= \
        set(read), "the scan finds nothing: has the layout changed?"


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


# the task state machine has one owner ----------------------------------------------------------
TRANSITIONS = PACKAGES["vigil"] / "transitions.py"


def _decides_a_task_end(tree: ast.AST) -> list[tuple[int, str]]:
    """Where code builds a ``Finished`` event or writes the status ``dead`` (a ``status=``
    keyword, or an assignment of the literal): both belong to vigil.transitions."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            if name == "Finished":
                found.append((node.lineno, "builds a Finished event"))
            for kw in node.keywords:
                if kw.arg == "status" and isinstance(kw.value, ast.Constant) \
                        and kw.value.value == "dead":
                    found.append((node.lineno, 'writes status="dead"'))
        elif isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(
                node.value, ast.Constant) and node.value.value == "dead":
            found.append((node.lineno, 'assigns "dead"'))
    return found


def test_only_the_state_machine_finishes_a_task_or_declares_it_dead() -> None:
    offenders = []
    for root in PACKAGES.values():
        for path in root.rglob("*.py"):
            if path == TRANSITIONS:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {what} (use vigil.transitions)"
                          for line, what in _decides_a_task_end(ast.parse(path.read_text()))]
    assert not offenders, offenders


def test_the_owner_check_sees_what_it_forbids() -> None:
    # The check itself can fail: each forbidden form is caught.
    code = ('e = Finished(task_id="t", time=now, status="failed")\n'
            'replace(state, status="dead")\nstatus = "dead"\nok = state.status == "dead"\n')
    assert sorted(line for line, _ in _decides_a_task_end(ast.parse(code))) == [1, 2, 3]


def test_state_machine_doc_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_sm", ROOT / "scripts" / "gen_state_machine_doc.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "state-machine.md").read_text() == gen.render(), (
        "docs/state-machine.md is stale: run .venv/bin/python scripts/gen_state_machine_doc.py")
