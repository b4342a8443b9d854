"""Registries: per plugin kind, registry name -> the plugins claiming it, imported lazily."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any

BUILTIN_PACKAGE = "pagedllm"

# "package.module:attr" or "package.module:Outer.attr"
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class PluginLoadError(ValueError):
    """A run asked for a registry name that the installed plugins cannot provide."""


@dataclass(frozen=True)
class PluginEntry:
    """One registration: a plugin providing ``name`` of ``kind`` as ``target``."""

    kind: str
    name: str
    #: The lazy import string, or ``module:qualname`` / ``repr`` of an object target.
    target: str
    #: Entry-point name of the providing plugin.
    plugin: str
    #: Distribution (PyPI) name of the providing package; None for inline plugins.
    package: str | None
    version: str | None
    info: dict[str, Any] = field(default_factory=dict)
    #: The target itself when it was registered as an object, not a string.
    obj: object = field(default=None, repr=False, compare=False)

    @property
    def is_builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE

    @property
    def is_lazy(self) -> bool:
        return self.obj is None

    @property
    def module(self) -> str | None:
        """The module a lazy target lives in (None for object targets)."""
        return self.target.partition(":")[0] if self.is_lazy else None

    def describe(self) -> str:
        """"'plugin' (package version)", for messages."""
        return describe_plugin(self.plugin, self.package, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "target": self.target, "plugin": self.plugin,
                "package": self.package, "version": self.version, "info": dict(self.info),
                "is_builtin": self.is_builtin}


def describe_plugin(plugin: str, package: str | None, version: str | None) -> str:
    where = " ".join(p for p in (package, version) if p) or "inline"
    return f"'{plugin}' ({where})"


def make_entry(kind: str, name: str, target: object, plugin: str, package: str | None,
               version: str | None, info: dict[str, Any]) -> PluginEntry:
    """Validate one ``register(name, target, **info)`` call and build its entry."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if isinstance(target, str):
        if not _TARGET_RE.match(target):
            raise ValueError(f"{kind} '{name}': target must be 'package.module:attr', got {target!r}")
        return PluginEntry(kind, name, target, plugin, package, version, dict(info))
    if target is None:
        raise ValueError(f"{kind} '{name}': target must be an import string or an object, got None")
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    shown = f"{module}:{qualname}" if module and qualname else repr(target)
    return PluginEntry(kind, name, shown, plugin, package, version, dict(info), obj=target)


def import_object(target: str) -> object:
    """Import ``"package.module"`` or ``"package.module:attr.sub"`` and return the object."""
    module_name, _, attr = target.partition(":")
    obj: object = importlib.import_module(module_name.strip())
    for part in filter(None, attr.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def _labels(kind: str) -> tuple[str, str, str]:
    """(what, 'is not ...', 'available ...') wording of a kind for error messages."""
    if kind == "model":
        return "model architecture", "is not supported", "supported architectures"
    return kind, "is not available", "available"


class Registry:
    """All claims on the names of one plugin kind, resolved when asked.

    Several plugins may claim a name. One claim: it wins. Several: a conflict, unless
    the name may be overridden, then the last claim (plugins register built-ins first)
    wins. Claims are kept in order so a failed plugin can be rolled back exactly.
    """

    def __init__(self, kind: str, allow_override: set[str] | frozenset[str] = frozenset()):
        self.kind = kind
        self._allow_override = set(allow_override)
        self._claims: dict[str, list[PluginEntry]] = {}
        self._loaded: dict[str, object] = {}
        #: name -> the description of a plugin that claimed it and was then left out.
        self.failed: dict[str, str] = {}

    def is_overridable(self, name: str) -> bool:
        return f"{self.kind}:{name}" in self._allow_override or name in self._allow_override

    def add(self, entry: PluginEntry) -> None:
        if any(e.plugin == entry.plugin for e in self._claims.get(entry.name, [])):
            raise ValueError(f"{self.kind} '{entry.name}' registered twice by plugin '{entry.plugin}'")
        self._claims.setdefault(entry.name, []).append(entry)

    def remove_plugin(self, plugin: str, reason: str) -> None:
        """Roll back every claim of ``plugin``; remember its names as failed with ``reason``."""
        for name in list(self._claims):
            kept = [e for e in self._claims[name] if e.plugin != plugin]
            if len(kept) != len(self._claims[name]):
                self.failed.setdefault(name, reason)
            if kept:
                self._claims[name] = kept
            else:
                del self._claims[name]

    def names(self) -> list[str]:
        return sorted(self._claims)

    def builtin_names(self) -> list[str]:
        return [n for n in self.names() if any(e.is_builtin for e in self._claims[n])]

    def entries(self) -> list[PluginEntry]:
        """The winning entry of each name; every claimant of a conflicted name."""
        out: list[PluginEntry] = []
        for name in self.names():
            claims = self._claims[name]
            out.extend(claims[-1:] if self.is_overridable(name) else claims)
        return out

    def conflicts(self) -> dict[str, list[PluginEntry]]:
        return {n: c for n, c in sorted(self._claims.items()) if len(c) > 1 and not self.is_overridable(n)}

    def resolve(self, name: str, hint: str = "") -> PluginEntry:
        """The entry that provides ``name``; PluginLoadError saying why there is none."""
        what, missing, available = _labels(self.kind)
        claims = self._claims.get(name)
        if not claims:
            if name in self.failed:
                raise PluginLoadError(f"{what} '{name}' is unavailable: plugin {self.failed[name]}")
            listed = ", ".join(self.names()) or "none"
            raise PluginLoadError(f"{what} '{name}' {missing}; {available}: {listed}{hint}")
        if len(claims) > 1 and not self.is_overridable(name):
            who = " and ".join(f"plugin {e.describe()}" for e in claims)
            raise PluginLoadError(
                f"{what} '{name}' is registered by more than one plugin: {who}; deny one with "
                f"plugins_deny, or let the later one take over with plugins_allow_override="
                f"['{self.kind}:{name}']")
        return claims[-1]

    def load(self, name: str, hint: str = "") -> object:
        """Resolve ``name`` and import its target once; later calls return the same object."""
        if name in self._loaded:
            return self._loaded[name]
        entry = self.resolve(name, hint)
        if entry.is_lazy:
            try:
                obj = import_object(entry.target)
            except Exception as exc:
                raise PluginLoadError(
                    f"{self.kind} '{name}' of plugin {entry.describe()} could not be imported from "
                    f"'{entry.target}': {type(exc).__name__}: {exc}") from exc
        else:
            obj = entry.obj
        self._loaded[name] = obj
        return obj
