"""Plugin discovery, isolation of broken plugins, conflicts, allow/deny, listing, and the example plugin."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap
import tomllib
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from pagedllm import hookimpl
from pagedllm.core import plugins as plugins_module
from pagedllm.core.config import PluginConfig
from pagedllm.core.hookspecs import KIND_HOOKS
from pagedllm.core.plugins import PluginLoadError, PluginSource, build_plugin_manager
from pagedllm.core.request import Request
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.entrypoints.plugins_cmd import format_plugins, plugins_command

# `plugin_manager_factory` comes from pagedllm's test kit, a pytest plugin (pytest11 entry
# point), exactly as a third-party plugin's tests get it.

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PACKAGE = "pagedllm-example-plugin"


# -- throwaway plugins ----------------------------------------------------------------


class ToyToolParser:
    pass


class ToolsPlugin:
    @hookimpl
    def pagedllm_register_tool_parsers(self, register):
        register("toy", "toy_parsers_not_installed.toy:ToyToolParser", description="a toy parser")
        register("toy_obj", ToyToolParser)


class BrokenHalfwayPlugin:
    """Registers one name, then raises: the name must be rolled back."""

    @hookimpl
    def pagedllm_register_reasoning_parsers(self, register):
        register("half", "somewhere.half:HalfParser")
        raise RuntimeError("boom in registration")


class MisspeltHookPlugin:
    @hookimpl
    def pagedllm_register_tool_parsers(self, register):
        register("misspelt_ok", ToyToolParser)

    @hookimpl
    def pagedllm_register_modles(self, register):
        register("Nope", ToyToolParser)


class UnmarkedHookPlugin:
    def pagedllm_register_tool_parsers(self, register):
        register("unmarked", ToyToolParser)


class WrongArgumentPlugin:
    @hookimpl
    def pagedllm_register_tool_parsers(self, callback):
        callback("wrong", ToyToolParser)


def processor_plugin(name: str, target: object) -> object:
    """An inline plugin registering one logits processor."""

    @hookimpl
    def pagedllm_register_logits_processors(register):
        register(name, target)

    return SimpleNamespace(pagedllm_register_logits_processors=pagedllm_register_logits_processors)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """Write importable plugin modules: ``write(source) -> module name``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        module = f"fake_plugin_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return module

    return write


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Replace entry-point discovery: ``use(*sources)``."""

    def use(*sources: PluginSource) -> None:
        monkeypatch.setattr(plugins_module, "discover_entry_points", lambda: tuple(sources))

    return use


def good_module(plugin_dir, name: str = "good_proc") -> str:
    return plugin_dir(f"""
        import pagedllm

        @pagedllm.hookimpl
        def pagedllm_register_logits_processors(register):
            register("{name}", "collections:OrderedDict", description="good")
    """)


# -- inline plugins and lazy targets --------------------------------------------------


def test_inline_plugin_entries_and_lazy_import_errors(plugin_manager_factory):
    pm = plugin_manager_factory([("tools", ToolsPlugin())])
    assert pm.errors == []
    assert pm.names("tool_parser") == ["toy", "toy_obj"]
    toy = pm.entries("tool_parser")[0]
    assert (toy.kind, toy.name, toy.plugin, toy.package, toy.version) == ("tool_parser", "toy", "tools", None, None)
    assert toy.target == "toy_parsers_not_installed.toy:ToyToolParser"
    assert toy.info == {"description": "a toy parser"} and not toy.is_builtin
    with pytest.raises(PluginLoadError, match="tool_parser 'toy' of plugin 'tools'") as exc:
        pm.load("tool_parser", "toy")
    assert "toy_parsers_not_installed.toy:ToyToolParser" in str(exc.value)
    assert "ModuleNotFoundError" in str(exc.value)


def test_target_given_as_object(plugin_manager_factory):
    pm = plugin_manager_factory([("tools", ToolsPlugin())])
    assert pm.load("tool_parser", "toy_obj") is ToyToolParser
    entry = [e for e in pm.entries("tool_parser") if e.name == "toy_obj"][0]
    assert entry.target == f"{__name__}:ToyToolParser"


def test_load_imports_lazily_once(plugin_manager_factory):
    from collections import OrderedDict

    pm = plugin_manager_factory([("p", processor_plugin("ordered", "collections:OrderedDict"))])
    assert pm.load("logits_processor", "ordered") is OrderedDict
    assert pm.load("logits_processor", "ordered") is OrderedDict


def test_unknown_name_lists_what_is_available(plugin_manager_factory):
    pm = plugin_manager_factory([("tools", ToolsPlugin())])
    with pytest.raises(ValueError, match=r"tool_parser 'nope' is not available; available: toy, toy_obj"):
        pm.load("tool_parser", "nope")
    with pytest.raises(ValueError, match=r"model architecture 'Foo' is not supported; supported architectures: none"):
        pm.load("model", "Foo")
    with pytest.raises(ValueError, match="unknown plugin kind 'widget'"):
        pm.load("widget", "x")


def test_invalid_registration_is_the_plugins_error(plugin_manager_factory):
    pm = plugin_manager_factory([("bad_target", processor_plugin("x", "not a target")),
                                 ("ok", processor_plugin("y", ToyToolParser))])
    assert [e.plugin for e in pm.errors] == ["bad_target"]
    assert "must be 'package.module:attr'" in pm.errors[0].error
    assert pm.names("logits_processor") == ["y"]


# -- broken plugins are isolated ------------------------------------------------------


def test_hook_that_raises_is_reported_and_rolled_back(plugin_manager_factory):
    pm = plugin_manager_factory([("broken", BrokenHalfwayPlugin()), ("tools", ToolsPlugin())])
    assert [(e.plugin, e.kind) for e in pm.errors] == [("broken", "reasoning_parser")]
    assert "RuntimeError: boom in registration" in pm.errors[0].error
    assert pm.names("reasoning_parser") == []  # the partial registration is gone
    assert pm.names("tool_parser") == ["toy", "toy_obj"]  # the others still work
    assert [p.plugin for p in pm.plugins] == ["tools"]
    with pytest.raises(PluginLoadError, match="reasoning_parser 'half' is unavailable: plugin 'broken'") as exc:
        pm.load("reasoning_parser", "half")
    assert "boom in registration" in str(exc.value)
    # A name it never got to register: the message still points at the broken plugin.
    with pytest.raises(PluginLoadError, match="plugin 'broken' .*failed to load.*boom"):
        pm.load("reasoning_parser", "other")


def test_misspelt_hook_fails_loudly_as_that_plugins_error(plugin_manager_factory):
    pm = plugin_manager_factory([("misspelt", MisspeltHookPlugin()), ("tools", ToolsPlugin())])
    assert [e.plugin for e in pm.errors] == ["misspelt"]
    assert "unknown hook 'pagedllm_register_modles'" in pm.errors[0].error
    assert "did you mean 'pagedllm_register_models'?" in pm.errors[0].error
    assert "misspelt_ok" not in pm.names("tool_parser")  # left out entirely
    assert pm.names("tool_parser") == ["toy", "toy_obj"]
    assert pm.hooks.get_plugin("misspelt") is None


def test_unmarked_hook_and_wrong_argument_are_errors(plugin_manager_factory):
    pm = plugin_manager_factory([("unmarked", UnmarkedHookPlugin()), ("wrong_arg", WrongArgumentPlugin())])
    errors = {e.plugin: e.error for e in pm.errors}
    assert "not marked with @pagedllm.hookimpl" in errors["unmarked"]
    assert "callback" in errors["wrong_arg"] and "\n" not in errors["wrong_arg"]
    assert pm.names("tool_parser") == []


def test_duplicate_plugin_name_is_an_error(plugin_manager_factory):
    pm = plugin_manager_factory([("same", processor_plugin("a", ToyToolParser)),
                                 ("same", processor_plugin("b", ToyToolParser))])
    assert [e.plugin for e in pm.errors] == ["same"]
    assert "already taken" in pm.errors[0].error
    assert pm.names("logits_processor") == ["a"]


def test_entry_point_that_fails_to_import(fake_entry_points, plugin_dir):
    good = good_module(plugin_dir)
    fake_entry_points(PluginSource("broken", "no_such_module_for_pagedllm", "broken-pkg", "1.2.3"),
                      PluginSource("good", good, "good-pkg", "0.4"))
    pm = build_plugin_manager()
    assert len(pm.errors) == 1
    error = pm.errors[0]
    assert (error.plugin, error.package, error.version, error.kind) == ("broken", "broken-pkg", "1.2.3", None)
    assert "ModuleNotFoundError" in error.error and "no_such_module_for_pagedllm" in error.error
    entry = pm.entries("logits_processor")[0]
    assert (entry.name, entry.plugin, entry.package, entry.version) == ("good_proc", "good", "good-pkg", "0.4")
    with pytest.raises(PluginLoadError, match=r"plugin 'broken' \(broken-pkg 1.2.3\) failed to load"):
        pm.load("logits_processor", "missing")


# -- conflicts and overrides ----------------------------------------------------------


def test_conflict_names_both_plugins(plugin_manager_factory):
    pm = plugin_manager_factory([("first", processor_plugin("dup", ToyToolParser)),
                                 ("second", processor_plugin("dup", dict))])
    assert [(k, n, [e.plugin for e in c]) for k, n, c in pm.conflicts()] == [("logits_processor", "dup", ["first", "second"])]
    assert [e.plugin for e in pm.entries("logits_processor")] == ["first", "second"]
    with pytest.raises(PluginLoadError) as exc:
        pm.load("logits_processor", "dup")
    message = str(exc.value)
    assert "'first'" in message and "'second'" in message
    assert "plugins_allow_override=['logits_processor:dup']" in message


@pytest.mark.parametrize("override", ["logits_processor:good_proc", "good_proc"])
def test_override_lets_third_party_replace_builtin(fake_entry_points, plugin_dir, override):
    builtin = good_module(plugin_dir)
    third_party = plugin_dir("""
        import pagedllm

        @pagedllm.hookimpl
        def pagedllm_register_logits_processors(register):
            register("good_proc", "collections:Counter")
    """)
    # Listed third-party first: built-ins still register first.
    fake_entry_points(PluginSource("mine", third_party, "my-pkg", "2.0"),
                      PluginSource("samplers", builtin, "pagedllm", "0.1.0"))
    assert build_plugin_manager().conflicts()

    pm = build_plugin_manager(PluginConfig(plugins_allow_override=[override]))
    from collections import Counter

    assert pm.load("logits_processor", "good_proc") is Counter
    assert pm.conflicts() == [] and pm.errors == []
    [entry] = pm.entries("logits_processor")
    assert (entry.plugin, entry.package, entry.is_builtin) == ("mine", "my-pkg", False)
    assert pm.builtin_names("logits_processor") == ["good_proc"]  # still one of the always-on built-ins


# -- allow / deny ---------------------------------------------------------------------


def test_allow_and_deny(fake_entry_points, plugin_dir):
    fake_entry_points(*(PluginSource(n, good_module(plugin_dir, f"proc_{n}"), f"pkg-{n}", "1.0") for n in "abc"))
    pm = build_plugin_manager(PluginConfig(plugins_allow=["a", "b", "ghost"], plugins_deny=["b"]))
    assert pm.names("logits_processor") == ["proc_a"]
    assert {s.plugin: s.reason for s in pm.skipped} == {"b": "denied by plugins_deny", "c": "not in plugins_allow"}
    assert [(e.plugin, e.error) for e in pm.errors] == [("ghost", "named in plugins_allow but not installed")]
    with pytest.raises(PluginLoadError, match="skipped plugins: 'b' \\(denied by plugins_deny\\)"):
        pm.load("logits_processor", "proc_b")

    pm = build_plugin_manager(PluginConfig(plugins_deny=["a"]))
    assert pm.names("logits_processor") == ["proc_b", "proc_c"] and pm.errors == []


def test_extra_plugins_register_after_entry_points(fake_entry_points, plugin_dir):
    fake_entry_points(PluginSource("ep", good_module(plugin_dir), "ep-pkg", "1.0"))
    pm = build_plugin_manager(extra_plugins=[("inline", processor_plugin("inline_proc", ToyToolParser))])
    assert [p.plugin for p in pm.plugins] == ["ep", "inline"]
    assert pm.names("logits_processor") == ["good_proc", "inline_proc"]


# -- listing --------------------------------------------------------------------------


def listing_manager(fake_entry_points, plugin_dir):
    fake_entry_points(PluginSource("good", good_module(plugin_dir), "good-pkg", "0.4"),
                      PluginSource("broken", "no_such_module_for_pagedllm", "broken-pkg", "1.2.3"),
                      PluginSource("denied", "never_imported_module", "denied-pkg", "9.9"))
    config = PluginConfig(plugins_deny=["denied"])
    extra = [("one", processor_plugin("dup", ToyToolParser)), ("two", processor_plugin("dup", dict))]
    return config, extra


def test_format_plugins(fake_entry_points, plugin_dir):
    config, extra = listing_manager(fake_entry_points, plugin_dir)
    text = format_plugins(build_plugin_manager(config, extra_plugins=extra))
    for kind in KIND_HOOKS:
        assert kind in text
    for expected in ("good_proc", "good-pkg", "0.4", "collections:OrderedDict", "description=good",
                     "broken-pkg 1.2.3", "ModuleNotFoundError", "Conflicts:", "logits_processor 'dup'",
                     "'one' (inline), 'two' (inline)", "Skipped:", "'denied' (denied-pkg 9.9): denied by plugins_deny"):
        assert expected in text, expected
    assert "never_imported_module" not in sys.modules


def test_plugins_command_text_and_json(fake_entry_points, plugin_dir, capsys):
    config, _ = listing_manager(fake_entry_points, plugin_dir)
    assert plugins_command(config) == 0
    assert "good_proc" in capsys.readouterr().out

    assert plugins_command(config, as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["kinds"]) == set(KIND_HOOKS)
    [entry] = data["kinds"]["logits_processor"]
    assert entry | {"info": None} == {"kind": "logits_processor", "name": "good_proc", "target": "collections:OrderedDict",
                                      "plugin": "good", "package": "good-pkg", "version": "0.4", "info": None,
                                      "is_builtin": False}
    assert [e["plugin"] for e in data["errors"]] == ["broken"]
    assert [s["plugin"] for s in data["skipped"]] == ["denied"]


# -- the built-ins are declared like any plugin -------------------------------------------


def test_every_builtin_plugin_package_is_declared():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pagedllm.plugins"]
    plugins_dir = ROOT / "pagedllm" / "plugins"
    packages = {f"pagedllm.plugins.{p.parent.name}" for p in plugins_dir.glob("*/__init__.py")}
    packages |= {f"pagedllm.plugins.{p.stem}" for p in plugins_dir.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(declared.values()), f"undeclared plugin packages: {sorted(packages - set(declared.values()))}"


# -- the real example package ---------------------------------------------------------


@pytest.fixture
def example_version() -> str:
    try:
        return importlib.metadata.version(EXAMPLE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{EXAMPLE_PACKAGE} not installed: pip install --no-deps -e examples/pagedllm-example-plugin")


def test_example_plugin_is_discovered(example_version, plugin_manager_factory):
    pm = plugin_manager_factory([], include_entry_points=True)
    [entry] = [e for e in pm.entries("logits_processor") if e.name == "no_repeat_ngram"]
    assert (entry.plugin, entry.package, entry.version) == ("example", EXAMPLE_PACKAGE, example_version)
    assert entry.target == "pagedllm_example_plugin.processor:NoRepeatNGramProcessor"
    assert not entry.is_builtin
    processor_cls = pm.load("logits_processor", "no_repeat_ngram")
    assert processor_cls.__name__ == "NoRepeatNGramProcessor" and processor_cls.order == 100

    pm = build_plugin_manager(PluginConfig(plugins_deny=["example"]))
    assert "no_repeat_ngram" not in pm.names("logits_processor")
    assert [s.package for s in pm.skipped] == [EXAMPLE_PACKAGE]


def test_plugin_manager_factory_holds_only_the_given_plugins(example_version, plugin_manager_factory):
    import pagedllm_example_plugin

    pm = plugin_manager_factory([("example", pagedllm_example_plugin)])
    assert [(p.plugin, p.package) for p in pm.plugins] == [("example", None)]
    assert pm.names("logits_processor") == ["no_repeat_ngram"]
    assert all(pm.names(kind) == [] for kind in KIND_HOOKS if kind != "logits_processor")


def reference_banned(token_ids: list[int], n: int) -> set[int]:
    """Brute force: tokens t such that token_ids + [t] ends with an n-gram already present."""
    ngrams = {tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)}
    prefix = tuple(token_ids[len(token_ids) - n + 1:]) if n > 1 else ()
    return {g[-1] for g in ngrams if g[:-1] == prefix}


def test_no_repeat_ngram_processor(example_version):
    torch = pytest.importorskip("torch")
    from pagedllm_example_plugin.processor import NoRepeatNGramProcessor

    def request(prompt, output, extra_args):
        req = Request(f"r{len(prompt)}", prompt, SamplingParams(extra_args=extra_args))
        req.output_token_ids = output
        return req

    requests = [
        request([1, 2, 3, 1], [2], {"no_repeat_ngram_size": 3}),  # "1 2" was followed by 3
        request([5, 6, 5, 6], [], {"no_repeat_ngram_size": 2}),   # "6" was followed by 5
        request([7, 8, 7], [9], {"no_repeat_ngram_size": 1}),     # every seen token
        request([1, 2, 3, 1], [2], None),                         # off: unchanged
        request([1, 2, 3, 1], [2], {"other": 1}),                 # off: unchanged
        request([4, 4], [], {"no_repeat_ngram_size": 5}),         # too short: unchanged
    ]
    logits = torch.randn(len(requests), 12)  # [num_reqs, vocab]
    original = logits.clone()
    out = NoRepeatNGramProcessor().apply(logits, SimpleNamespace(requests=requests))

    for row, req in enumerate(requests):
        n = (req.sampling_params.extra_args or {}).get("no_repeat_ngram_size", 0)
        banned = reference_banned(req.prompt_token_ids + req.output_token_ids, n) if n else set()
        is_banned = torch.isinf(out[row]) & (out[row] < 0)
        assert set(is_banned.nonzero().flatten().tolist()) == banned, row
        kept = ~is_banned
        assert torch.equal(out[row][kept], original[row][kept])
    assert [reference_banned(r.prompt_token_ids + r.output_token_ids, 3) for r in requests[:1]] == [{3}]

    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        NoRepeatNGramProcessor().apply(torch.zeros(1, 12), SimpleNamespace(requests=[request([1], [], {"no_repeat_ngram_size": "3"})]))
