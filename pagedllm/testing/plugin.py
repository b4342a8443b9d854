"""pytest plugin shipped with pagedllm: fixtures that built-in and third-party plugin tests share."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from pagedllm.core.config import PluginConfig
from pagedllm.core.plugins import PluginManager, build_plugin_manager


def make_plugin_manager(plugins: Sequence[tuple[str, object]], include_entry_points: bool = False,
                        config: PluginConfig | None = None) -> PluginManager:
    """A fresh plugin manager holding only ``plugins`` (``(name, module_or_object)`` pairs),
    plus the installed entry points if ``include_entry_points``."""
    return build_plugin_manager(config, extra_plugins=plugins, entry_points=None if include_entry_points else ())


@pytest.fixture
def plugin_manager_factory() -> Callable[..., PluginManager]:
    """``factory(plugins, include_entry_points=False, config=None) -> PluginManager``.

    Example::

        def test_mine(plugin_manager_factory):
            pm = plugin_manager_factory([("mine", my_plugin_module)])
            assert pm.load("tool_parser", "mine") is MyToolParser
    """
    return make_plugin_manager
