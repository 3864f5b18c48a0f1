"""The `moa plugins` table."""

from __future__ import annotations

from moa.plugin import PluginInfo, format_provides, render_plugins_table


def test_table_has_columns_rows_errors_and_summary():
    infos = [
        PluginInfo("lora", "moa", "0.1.0", "builtin", "loaded",
                   provides={"adapter_types": ("lora",)}),
        PluginInfo("example", "moa-plugin-example", "0.1.0", "entry point", "loaded",
                   provides={"routers": ("round_robin",), "merge_strategies": ("avg",)}),
        PluginInfo("broken", "brokenplug", "2.3", "entry point", "failed",
                   error="ModuleNotFoundError: No module named 'x'"),
        PluginInfo("off", "offplug", "1.0", "entry point", "blocked"),
        PluginInfo("mine", None, None, "registered", "loaded"),
    ]

    table = render_plugins_table(infos)
    lines = table.splitlines()

    assert lines[0].split() == ["plugin", "distribution", "version", "source", "status", "provides"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    example = next(line for line in lines if line.startswith("example"))
    assert example.split()[:6] == ["example", "moa-plugin-example", "0.1.0", "entry", "point",
                                   "loaded"]
    assert example.endswith("routers: round_robin; merge strategies: avg")
    broken_at = next(i for i, line in enumerate(lines) if line.startswith("broken "))
    assert "failed" in lines[broken_at]
    assert lines[broken_at + 1].strip() == "error: ModuleNotFoundError: No module named 'x'"
    mine = next(line for line in lines if line.startswith("mine"))
    assert mine.split() == ["mine", "-", "-", "registered", "loaded", "-"]
    assert lines[-1].startswith("3 loaded, 1 failed, 1 blocked.")
    assert "MOA_STRICT_PLUGINS=1" in lines[-1] and "MOA_DISABLE_PLUGINS" in lines[-1]
    # columns line up: every row's status starts at the header's "status" column
    col = lines[0].index("status")
    assert all(lines[i][col:].split()[0] in {"loaded", "failed", "blocked"}
               for i in range(2, len(lines) - 1) if not lines[i].startswith(" "))


def test_empty_table_and_provides_formatting():
    assert "No moa plugins found" in render_plugins_table([])
    assert format_provides({}) == "-"
    assert format_provides({"routers": ("a", "b"), "adapter_types": ("lora",)}) == (
        "adapter types: lora; routers: a, b")


def test_describe_names_the_distribution():
    example = PluginInfo("example", "moa-plugin-example", "0.1.0", "entry point", "loaded")
    assert example.describe() == "plugin 'example' (distribution moa-plugin-example 0.1.0)"
    assert PluginInfo("lora", "moa", "0.1.0", "builtin", "loaded").describe() \
        == "plugin 'lora' (built into moa 0.1.0)"
    assert PluginInfo("mine", None, None, "registered", "loaded").describe() \
        == "plugin 'mine' (registered in code)"
