"""Testing tools for moa plugin authors: tiny-model fixtures and contract test suites.

* :mod:`moa.testing.fixtures`: a tiny random Llama base and tokenizer, a fresh plugin
  manager, and pytest fixtures over them. Enable the fixtures in your plugin package's
  top-level test ``conftest.py`` with ``pytest_plugins = ["moa.testing.fixtures"]``
  (moa deliberately registers no ``pytest11`` entry point: installing moa must not add
  fixtures to every pytest run in the environment).
* :mod:`moa.testing.contract`: :class:`AdapterTypeContract` and :class:`RouterContract`,
  suites every adapter type or router must pass, and :class:`PluginInstallContract`, what
  an installed plugin package must show; subclass one in a ``Test...`` class.

Example::

    from moa.testing import AdapterTypeContract

    class TestMyTypeContract(AdapterTypeContract):
        adapter_type = "my_type"
        config_kwargs = {"target_modules": ["q_proj", "v_proj"]}

This package imports pytest; import it from tests only.
"""

from moa.testing.contract import AdapterTypeContract, PluginInstallContract, RouterContract
from moa.testing.fixtures import (
    TINY_CONFIG,
    fresh_plugin_manager,
    load_tiny_base,
    make_tiny_base,
    make_tiny_model,
    make_tiny_tokenizer,
    random_input_ids,
    require_plugin,
    save_tiny_base,
)

__all__ = [
    "TINY_CONFIG",
    "AdapterTypeContract",
    "PluginInstallContract",
    "RouterContract",
    "fresh_plugin_manager",
    "load_tiny_base",
    "make_tiny_base",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "random_input_ids",
    "require_plugin",
    "save_tiny_base",
]
