"""The plugin manager: discover entry points, apply allow/deny, register each plugin in isolation."""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from pagedllm.core import hookspecs
from pagedllm.core.config import PluginConfig
from pagedllm.core.hookspecs import ENTRY_POINT_GROUP, KIND_HOOKS, PROJECT_NAME
from pagedllm.core.registry import (
    BUILTIN_PACKAGE,
    PluginEntry,
    PluginLoadError,
    Registry,
    describe_plugin,
    import_object,
    make_entry,
)

__all__ = [
    "PluginEntry", "PluginError", "PluginInfo", "PluginLoadError", "PluginManager", "PluginSource",
    "SkippedPlugin", "build_plugin_manager", "discover_entry_points",
]


def canonical_package(name: str) -> str:
    """PEP 503 form of a distribution name: 'Pagedllm_Example.Plugin' -> 'pagedllm-example-plugin'."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PluginSource:
    """One discovered plugin: an entry point's name and value and the package declaring it."""

    name: str
    #: "package.module" or "package.module:attr", as in the entry point.
    value: str
    package: str | None = None
    version: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE

    def load(self) -> object:
        return import_object(self.value.split("[")[0].strip())  # drop "[extras]"


@dataclass(frozen=True)
class PluginInfo:
    """A plugin that registered successfully."""

    plugin: str
    package: str | None
    version: str | None
    num_entries: int

    @property
    def is_builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE


@dataclass(frozen=True)
class PluginError:
    """A plugin left out because it failed to import, validate or register."""

    plugin: str
    package: str | None
    version: str | None
    error: str
    #: The kind whose hook raised; None when the plugin failed before registering.
    kind: str | None = None

    def describe(self) -> str:
        return f"{describe_plugin(self.plugin, self.package, self.version)} failed to load: {self.error}"


@dataclass(frozen=True)
class SkippedPlugin:
    """An installed plugin not loaded because of ``plugins_allow`` / ``plugins_deny``."""

    plugin: str
    package: str | None
    version: str | None
    reason: str


@functools.cache
def discover_entry_points() -> tuple[PluginSource, ...]:
    """Every entry point in group ``pagedllm.plugins``, read once per process.

    Sorted so the ``pagedllm`` distribution's own plugins come first, then the others by
    package and name: a later plugin may only take over a name the user lets it.
    """
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        package = canonical_package(dist.name) if dist is not None else None
        found.append(PluginSource(ep.name, ep.value, package, dist.version if dist is not None else None))
    found.sort(key=lambda s: (not s.is_builtin, s.package or "", s.name))
    return tuple(found)


class PluginManager:
    """The loaded plugins and one lazy registry per plugin kind.

    Build it with :func:`build_plugin_manager`; it is passed down, never global.
    """

    def __init__(self, config: PluginConfig | None = None):
        self.config = config or PluginConfig()
        self.hooks = pluggy.PluginManager(PROJECT_NAME)
        self.hooks.add_hookspecs(hookspecs)
        overridable = frozenset(self.config.plugins_allow_override)
        self.registries = {kind: Registry(kind, overridable) for kind in KIND_HOOKS}
        self.plugins: list[PluginInfo] = []
        self.errors: list[PluginError] = []
        self.skipped: list[SkippedPlugin] = []

    # -- building --------------------------------------------------------------------

    def add_source(self, source: PluginSource) -> bool:
        """Import an entry point's object and add it as a plugin; False if it failed."""
        try:
            obj = source.load()
        except Exception as exc:
            return self._fail(source.name, source.package, source.version, exc)
        return self.add_plugin(source.name, obj, source.package, source.version)

    def add_plugin(self, name: str, obj: object, package: str | None = None, version: str | None = None) -> bool:
        """Register ``obj`` and run its registration hooks; on any error leave it out."""
        if self.hooks.has_plugin(name) or any(p.plugin == name for p in self.plugins):
            return self._fail(name, package, version, f"the plugin name '{name}' is already taken")
        if self.hooks.is_registered(obj):
            return self._fail(name, package, version, f"already registered as plugin '{self.hooks.get_name(obj)}'")
        try:
            self.hooks.register(obj, name=name)
            self._validate(obj)
        except Exception as exc:
            if self.hooks.has_plugin(name):
                self.hooks.unregister(name=name)
            return self._fail(name, package, version, exc)
        added: list[PluginEntry] = []
        kind = None
        try:
            # One plugin at a time, so an error is this plugin's alone.
            for kind, hook_name in KIND_HOOKS.items():
                for impl in getattr(self.hooks.hook, hook_name).get_hookimpls():
                    if impl.plugin_name == name:
                        if impl.hookwrapper or impl.wrapper:
                            raise ValueError(f"{hook_name} cannot be a hook wrapper")
                        register = self._register_callback(kind, name, package, version, added)
                        impl.function(**{arg: register for arg in impl.argnames})
        except Exception as exc:
            self.hooks.unregister(name=name)
            error = self._error(name, package, version, exc, kind)
            for registry in self.registries.values():
                registry.remove_plugin(name, error.describe())
            self.errors.append(error)
            return False
        self.plugins.append(PluginInfo(name, package, version, len(added)))
        return True

    def _register_callback(self, kind: str, plugin: str, package: str | None, version: str | None,
                           added: list[PluginEntry]) -> Callable[..., None]:
        """The ``register(name, target, **info)`` callback handed to one plugin's hook."""
        registry = self.registries[kind]

        def register(name: str, target: object, **info: Any) -> None:
            entry = make_entry(kind, name, target, plugin, package, version, info)
            registry.add(entry)
            added.append(entry)

        return register

    def _validate(self, obj: object) -> None:
        """Fail loudly on hooks pagedllm does not define and on unmarked ``pagedllm_*`` functions."""
        known = list(KIND_HOOKS.values())
        for caller in self.hooks.get_hookcallers(obj) or []:
            if caller.name not in known:
                close = difflib.get_close_matches(caller.name, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"pagedllm hooks are: {', '.join(known)}"
                raise ValueError(f"unknown hook '{caller.name}'; {hint}")
        for attr in dir(obj):
            if attr.startswith("pagedllm_") and self.hooks.parse_hookimpl_opts(obj, attr) is None:
                value = getattr(obj, attr, None)
                if callable(value) and not hasattr(value, f"{PROJECT_NAME}_spec"):
                    raise ValueError(f"'{attr}' is not marked with @pagedllm.hookimpl")
        self.hooks.check_pending()

    def _error(self, name: str, package: str | None, version: str | None, exc: Exception | str,
               kind: str | None = None) -> PluginError:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        text = " ".join(text.split())  # one line in listings (pluggy's messages span several)
        if kind is not None:
            text = f"in {KIND_HOOKS[kind]}: {text}"
        return PluginError(name, package, version, text, kind)

    def _fail(self, name: str, package: str | None, version: str | None, exc: Exception | str) -> bool:
        self.errors.append(self._error(name, package, version, exc))
        return False

    # -- using -----------------------------------------------------------------------

    def _registry(self, kind: str) -> Registry:
        if kind not in self.registries:
            raise ValueError(f"unknown plugin kind '{kind}'; kinds: {', '.join(KIND_HOOKS)}")
        return self.registries[kind]

    def load(self, kind: str, name: str) -> object:
        """The object registered as ``name`` of ``kind``, imported on first use.

        Raises :class:`PluginLoadError` (a ValueError) naming what is available, the
        plugin that failed to provide it, or the plugins in conflict.
        """
        return self._registry(kind).load(name, self._hint(kind))

    def _hint(self, kind: str) -> str:
        """What else may explain a missing name: plugins that failed or were skipped."""
        failed = [e.describe() for e in self.errors if e.kind in (None, kind)]
        skipped = [f"'{s.plugin}' ({s.reason})" for s in self.skipped]
        hint = f"; plugin {'; plugin '.join(failed)}" if failed else ""
        return hint + (f"; skipped plugins: {', '.join(skipped)}" if skipped else "")

    def names(self, kind: str) -> list[str]:
        return self._registry(kind).names()

    def builtin_names(self, kind: str) -> list[str]:
        """Names a built-in plugin registered, including those a third party took over."""
        return self._registry(kind).builtin_names()

    def entries(self, kind: str | None = None) -> list[PluginEntry]:
        """Registered entries (of one kind or all), by kind then name."""
        kinds = [kind] if kind is not None else list(KIND_HOOKS)
        return [e for k in kinds for e in self._registry(k).entries()]

    def conflicts(self) -> list[tuple[str, str, list[PluginEntry]]]:
        """(kind, name, claimants) for every name several plugins claim without an override."""
        return [(k, n, c) for k, r in self.registries.items() for n, c in r.conflicts().items()]


def build_plugin_manager(config: PluginConfig | None = None,
                         extra_plugins: Sequence[tuple[str, object]] = (),
                         entry_points: Sequence[PluginSource] | None = None) -> PluginManager:
    """Build a plugin manager from the installed entry points and ``extra_plugins``.

    ``plugins_allow`` / ``plugins_deny`` (deny wins) select entry points by name; skipped
    ones are listed in ``pm.skipped``. ``extra_plugins`` are ``(name, module_or_object)``
    pairs registered after the entry points, always. ``entry_points`` replaces discovery
    (``()`` for none). Only the registration modules are imported; targets stay lazy.
    """
    pm = PluginManager(config)
    allow, deny = pm.config.plugins_allow, set(pm.config.plugins_deny)
    sources = discover_entry_points() if entry_points is None else entry_points
    # Built-ins register first, so a third-party name can only take over when allowed.
    for source in sorted(sources, key=lambda s: not s.is_builtin):
        if source.name in deny:
            pm.skipped.append(SkippedPlugin(source.name, source.package, source.version, "denied by plugins_deny"))
        elif allow is not None and source.name not in allow:
            pm.skipped.append(SkippedPlugin(source.name, source.package, source.version, "not in plugins_allow"))
        else:
            pm.add_source(source)
    for name in sorted(set(allow or ()) - deny - {s.name for s in sources}):
        pm.errors.append(PluginError(name, None, None, "named in plugins_allow but not installed"))
    for name, obj in extra_plugins:
        pm.add_plugin(name, obj)
    return pm
