"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import textwrap

from moa.testing import require_plugin

moa_ia3 = require_plugin("moa-ia3", "moa_ia3")


def test_entry_point_metadata_names_the_plugin_module():
    dist = importlib.metadata.distribution("moa-ia3")
    eps = [ep for ep in dist.entry_points if ep.group == "moa"]
    assert [(ep.name, ep.value) for ep in eps] == [("ia3", "moa_ia3.plugin")]
    assert dist.version == moa_ia3.__version__


def test_moa_plugins_lists_it_with_distribution_and_version(moa_plugin_manager):
    from moa.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plugins"]) == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith("ia3 "))
    assert row.split()[:5] == ["ia3", "moa-ia3", moa_ia3.__version__, "entry", "point"]
    assert row.rstrip().endswith("adapter types: ia3")


def test_fresh_process_discovers_ia3_from_metadata():
    code = textwrap.dedent("""
        import importlib.metadata, json
        import moa
        from moa.plugin import list_plugins
        spec = moa.get_adapter_type("ia3")
        info = {i.name: i for i in list_plugins()}["ia3"]
        eps = importlib.metadata.entry_points(group="moa", name="ia3")
        print(json.dumps([spec.config_class.__module__, spec.peft_type, info.distribution,
                          info.version, info.source, [ep.value for ep in eps]]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MOA_DISABLE_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        "moa_ia3.ia3", "IA3", "moa-ia3", moa_ia3.__version__, "entry point", ["moa_ia3.plugin"]]
