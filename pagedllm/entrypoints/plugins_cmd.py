"""`pagedllm plugins`: list every plugin kind, name, providing package and version, and load errors."""

from __future__ import annotations

import json
from typing import Any

from pagedllm.core.config import PluginConfig
from pagedllm.core.hookspecs import KIND_HOOKS
from pagedllm.core.plugins import PluginManager, build_plugin_manager
from pagedllm.core.registry import describe_plugin

_COLUMNS = ("KIND", "NAME", "PLUGIN", "PACKAGE", "VERSION", "TARGET", "INFO")


def _info(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.items())


def _conflict_lines(pm: PluginManager) -> list[str]:
    lines = []
    for kind, name, claims in pm.conflicts():
        who = ", ".join(describe_plugin(e.plugin, e.package, e.version) for e in claims)
        lines.append(f"  {kind} '{name}': claimed by {who}; "
                     f"set plugins_allow_override=['{kind}:{name}'] to let the last one take over")
    return lines


def format_plugins(pm: PluginManager) -> str:
    """A table of every kind's registered names, then conflicts, load errors and skipped plugins."""
    rows: list[tuple[str, ...]] = []
    for kind in KIND_HOOKS:
        entries = pm.entries(kind)
        if not entries:
            rows.append((kind, "-", "", "", "", "", ""))
        for e in entries:
            rows.append((kind, e.name, e.plugin, e.package or "(inline)", e.version or "", e.target, _info(e.info)))
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [_COLUMNS, *rows]]

    lines.append("")
    lines.append("Plugins: " + (", ".join(
        f"{describe_plugin(p.plugin, p.package, p.version)} [{p.num_entries}]" for p in pm.plugins) or "none"))
    conflicts = _conflict_lines(pm)
    lines.append("Conflicts:" + ("" if conflicts else " none"))
    lines.extend(conflicts)
    lines.append("Load errors:" + ("" if pm.errors else " none"))
    lines.extend(f"  plugin {e.describe()}" for e in pm.errors)
    if pm.skipped:
        lines.append("Skipped:")
        lines.extend(f"  plugin {describe_plugin(s.plugin, s.package, s.version)}: {s.reason}" for s in pm.skipped)
    return "\n".join(lines)


def plugins_as_dict(pm: PluginManager) -> dict[str, Any]:
    """The listing as plain data (the ``--json`` output)."""
    return {
        "kinds": {kind: [e.to_dict() for e in pm.entries(kind)] for kind in KIND_HOOKS},
        "plugins": [{"plugin": p.plugin, "package": p.package, "version": p.version,
                     "is_builtin": p.is_builtin, "num_entries": p.num_entries} for p in pm.plugins],
        "conflicts": [{"kind": k, "name": n, "plugins": [e.plugin for e in c]} for k, n, c in pm.conflicts()],
        "errors": [{"plugin": e.plugin, "package": e.package, "version": e.version, "kind": e.kind,
                    "error": e.error} for e in pm.errors],
        "skipped": [{"plugin": s.plugin, "package": s.package, "version": s.version, "reason": s.reason}
                    for s in pm.skipped],
    }


def plugins_command(config: PluginConfig, as_json: bool = False) -> int:
    """Print the plugin listing; returns the exit code (0: listing a broken plugin is not a failure)."""
    pm = build_plugin_manager(config)
    if as_json:
        print(json.dumps(plugins_as_dict(pm), indent=2, default=str))
    else:
        print(format_plugins(pm))
    return 0
