"""`import pagedllm` and listing plugins import no torch, no transformers and no plugin implementation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys

    HEAVY = ("torch", "transformers")
    report = {}

    import pagedllm
    report["heavy_after_import"] = [m for m in HEAVY if m in sys.modules]

    from pagedllm.core.plugins import build_plugin_manager, discover_entry_points
    from pagedllm.entrypoints.plugins_cmd import format_plugins

    pm = build_plugin_manager()
    text = format_plugins(pm)
    report["heavy_after_listing"] = [m for m in HEAVY if m in sys.modules]

    lazy = [e for e in pm.entries() if e.is_lazy]
    report["num_lazy_entries"] = len(lazy)
    report["imported_targets"] = sorted({e.module for e in lazy if e.module in sys.modules})

    # Only the registration modules named by entry points (and their parent packages) load.
    registration = {s.value.partition(":")[0] for s in discover_entry_points()}
    allowed = {".".join(m.split(".")[:i]) for m in registration for i in range(1, m.count(".") + 2)}
    def is_plugin_module(m):
        roots = {r.split(".")[0] for r in registration if not r.startswith("pagedllm.")}
        return m.startswith("pagedllm.plugins.") or m.split(".")[0] in roots
    report["unexpected_plugin_modules"] = sorted(m for m in sys.modules if is_plugin_module(m) and m not in allowed)
    report["registration_modules"] = sorted(registration)

    # Sanity check of the probe itself: loading a target does import its module.
    if lazy:
        entry = next((e for e in lazy if e.name == "no_repeat_ngram"), None)
        if entry is not None:
            pm.load(entry.kind, entry.name)
            report["loaded_module_seen"] = entry.module in sys.modules
    report["errors"] = [e.describe() for e in pm.errors]
    print(json.dumps(report))
""")


def run_probe() -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_and_listing_stay_light():
    report = run_probe()
    assert report["heavy_after_import"] == []
    assert report["heavy_after_listing"] == [], report["errors"]
    assert report["num_lazy_entries"] > 0
    assert report["imported_targets"] == []
    assert report["unexpected_plugin_modules"] == []
    assert report.get("loaded_module_seen", True) is True
