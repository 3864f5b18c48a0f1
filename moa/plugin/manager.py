"""The moa plugin manager: built-ins, entry points, isolation of failures, lookups.

:class:`MoaPluginManager` wraps a ``pluggy.PluginManager("moa")``. It registers the
built-ins of :data:`moa.default_plugins.BUILTIN_PLUGINS`, then every entry point of the
``moa`` group, one at a time: a plugin that fails to import, to register, names a hook
moa does not have, raises in a hook or returns something other than a list of records
is skipped with one :class:`MoaPluginWarning` (and a log record) naming the plugin, its
distribution and the error. ``MOA_STRICT_PLUGINS=1`` turns that into a
:class:`~moa.errors.PluginError`; ``MOA_DISABLE_PLUGINS=a,b`` blocks plugins by name.
Only public pluggy API is used.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pluggy

from moa.errors import PluginConflictError, PluginError, UnknownPluginError, format_choices
from moa.plugin.records import AdapterTypeSpec, InputAdapterTypeSpec, MergeStrategySpec, RouterSpec
from moa.plugin.report import PluginInfo, PluginSource, distribution_of, moa_version
from moa.plugin.validation import HOOK_KINDS, check_records, hook_suggestion, unknown_hooks

logger = logging.getLogger(__name__)

PROJECT_NAME = "moa"
#: Entry-point group third-party plugins declare: ``[project.entry-points.moa]``.
ENTRY_POINT_GROUP = "moa"
STRICT_ENV = "MOA_STRICT_PLUGINS"
DISABLE_ENV = "MOA_DISABLE_PLUGINS"

_LABEL = {"adapter_types": "adapter type", "routers": "router",
          "merge_strategies": "merge strategy", "input_adapter_types": "input adapter type"}
#: The two kinds of adapter types: their names and PEFT types are unique across both.
_ADAPTER_KINDS = ("adapter_types", "input_adapter_types")


class MoaPluginWarning(UserWarning):
    """A plugin was skipped because it is broken (see the message for which and why)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_names(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


class _Rejected(Exception):
    """Internal: why a plugin is skipped (the 'what' part of the warning)."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(what)
        self.what = what
        self.cause = cause


class MoaPluginManager:
    """Discovers, validates and looks up moa plugins.

    Args:
        load_builtins: Register :data:`moa.default_plugins.BUILTIN_PLUGINS`.
        load_entry_points: Register every entry point of the ``moa`` group (entry points
            that name a built-in module are skipped: built-ins load once, as built-ins).
        strict: Raise :class:`PluginError` instead of warning when a plugin is broken;
            ``None`` reads ``MOA_STRICT_PLUGINS``.
        disabled: Plugin names to block; ``None`` reads ``MOA_DISABLE_PLUGINS`` (comma-separated).

    Raises:
        PluginConflictError: Two plugins share a plugin name, or register the same name
            (or PEFT type) for the same kind.
        PluginError: A plugin is broken and ``strict`` is on.

    Example::

        pm = MoaPluginManager()
        router_cls = pm.get_router("fixed")
    """

    def __init__(self, *, load_builtins: bool = True, load_entry_points: bool = True,
                 strict: bool | None = None, disabled: Iterable[str] | None = None) -> None:
        from moa import hookspecs  # imported here: hookspecs itself imports moa.plugin

        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._strict = _env_flag(STRICT_ENV) if strict is None else bool(strict)
        self._disabled = tuple(_env_names(DISABLE_ENV) if disabled is None else disabled)
        self._infos: dict[str, PluginInfo] = {}
        # kind -> record name -> (record, plugin name)
        self._records: dict[str, dict[str, tuple[Any, str]]] = {k: {} for k in HOOK_KINDS.values()}
        for name in self._disabled:
            self._pm.set_blocked(name)
        if load_builtins:
            self._load_builtins()
        if load_entry_points:
            self._load_entry_points()
        unmatched = [n for n in self._disabled if n not in self._infos]
        if unmatched:
            logger.warning("%s names %s, which no installed moa plugin uses. Known plugins: %s.",
                           DISABLE_ENV, ", ".join(unmatched), format_choices(self._infos))

    # --- loading ------------------------------------------------------------------------

    @property
    def pluggy_manager(self) -> pluggy.PluginManager:
        """The wrapped pluggy manager (prefer :meth:`register`, which validates)."""
        return self._pm

    @property
    def strict(self) -> bool:
        """Whether broken plugins raise instead of being skipped with a warning."""
        return self._strict

    def _load_builtins(self) -> None:
        from moa.default_plugins import BUILTIN_PLUGINS

        version = moa_version()
        for name, module_path in BUILTIN_PLUGINS:
            self._load(name, "moa", version, "builtin",
                       lambda path=module_path: importlib.import_module(path))

    def _load_entry_points(self) -> None:
        from moa.default_plugins import BUILTIN_PLUGINS

        builtin_modules = {path for _, path in BUILTIN_PLUGINS}
        try:
            eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        except Exception as exc:  # noqa: BLE001 - corrupt metadata of some unrelated dist
            logger.warning("Could not read the %r entry points (%s: %s); only built-in moa "
                           "plugins are loaded.", ENTRY_POINT_GROUP, type(exc).__name__, exc)
            return
        for ep in eps:
            dist, version = distribution_of(ep)
            if ep.value.split(":")[0].strip() in builtin_modules:
                logger.debug("Entry point %r (%s) names built-in module %s; loaded as built-in.",
                             ep.name, dist, ep.value)
                continue
            self._load(ep.name, dist, version, "entry point", ep.load)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """Register a plugin object (usually a module) in code, e.g. in tests.

        Unlike discovery, a broken plugin raises here (the caller is right there).

        Args:
            plugin: A module, class or object with ``@hookimpl`` functions.
            name: Plugin name; defaults to pluggy's canonical name (a module's ``__name__``).

        Returns:
            The plugin name, or ``None`` when that name is blocked by ``MOA_DISABLE_PLUGINS``.

        Raises:
            PluginError: The plugin fails validation, names an unknown hook, or a hook
                raises or returns invalid records. The manager is left unchanged.
            PluginConflictError: The plugin name, or a name it provides, is already taken.
        """
        name = name or self._pm.get_canonical_name(plugin)
        loaded = self._load(name, None, None, "registered", lambda: plugin, strict=True)
        return name if loaded else None

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it registered.

        Args:
            name: A plugin name from :meth:`list_plugins`.

        Raises:
            UnknownPluginError: No plugin of that name is listed.
        """
        if name not in self._infos:
            raise UnknownPluginError(f"Unknown plugin {name!r}. Listed: "
                                     f"{format_choices(self._infos)}. Run 'moa plugins'.")
        if self._infos[name].status == "loaded":
            self._pm.unregister(name=name)
        for table in self._records.values():
            for rec_name in [n for n, (_, owner) in table.items() if owner == name]:
                del table[rec_name]
        del self._infos[name]

    def _load(self, name: str, dist: str | None, version: str | None, source: PluginSource,
              loader: Callable[[], Any], strict: bool | None = None) -> bool:
        info = PluginInfo(name, dist, version, source, "loaded")
        if self._pm.is_blocked(name):
            self._infos[name] = PluginInfo(name, dist, version, source, "blocked")
            logger.info("moa %s is blocked by %s; not loaded.", info.describe(), DISABLE_ENV)
            return False
        if name in self._infos:
            first = self._infos[name]
            step = ("Register it under another name: register(plugin, name=...)."
                    if source == "registered" else
                    f"Uninstall one of them (pip uninstall {dist or first.distribution}).")
            raise PluginConflictError(f"Two moa plugins are named {name!r}: {first.describe()} "
                                      f"and {info.describe()}. Plugin names must be unique. {step}")
        try:
            provided = self._import_register_collect(name, loader)
        except _Rejected as rej:
            self._reject(info, rej, self._strict if strict is None else strict)
            return False
        try:
            self._check_conflicts(info, provided)
        except PluginConflictError:
            self._pm.unregister(name=name)
            raise
        for kind, recs in provided.items():
            for rec in recs:
                self._records[kind][rec.name] = (rec, name)
        self._infos[name] = PluginInfo(
            name, dist, version, source, "loaded",
            provides={k: tuple(r.name for r in recs) for k, recs in provided.items() if recs})
        logger.debug("Loaded moa %s: %s", info.describe(), self._infos[name].provides)
        return True

    def _import_register_collect(self, name: str, loader: Callable[[], Any]) -> dict[str, list]:
        try:
            plugin = loader()
        except Exception as exc:  # noqa: BLE001 - any import error is the plugin's
            raise _Rejected("failed to import", exc) from exc
        if plugin is None:  # pluggy would silently ignore it
            raise _Rejected("failed to import", PluginError("its entry point resolved to None"))
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001 - PluginValidationError, ValueError
            if self._pm.get_plugin(name) is plugin:  # older pluggy registers partially
                self._pm.unregister(name=name)
            raise _Rejected("was rejected by pluggy on register", exc) from exc
        if not self._pm.get_hookcallers(plugin):
            self._pm.unregister(name=name)
            undecorated = sorted(a for a in dir(plugin) if a.startswith("moa_"))
            hint = (f" {', '.join(undecorated)} lack the @hookimpl decorator "
                    f"(from moa.hookspecs import hookimpl)." if undecorated else "")
            raise _Rejected("implements no moa hook", PluginError(
                f"{plugin!r:.100} has no @hookimpl functions.{hint} Valid hooks: "
                f"{format_choices(HOOK_KINDS)}"))
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            bad = unknown_hooks(self._pm, plugin)
            self._pm.unregister(name=name)
            if not bad:  # the culprit was registered on pluggy_manager directly: name it
                self.check_pending()
            hooks = ", ".join(f"{h!r}{hook_suggestion(h)}" for h in bad)
            raise _Rejected("implements an unknown hook", PluginError(
                f"{hooks} is not a moa hook; valid hooks: {format_choices(HOOK_KINDS)}")) from exc
        provided: dict[str, list] = {}
        for hook_name, kind in HOOK_KINDS.items():
            recs: list[Any] = []
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    if impl.wrapper or impl.hookwrapper:
                        raise PluginError(f"{hook_name} is a hook wrapper; moa hooks must "
                                          f"return records, not wrap other plugins.")
                    try:
                        result = impl.function()
                    except Exception as exc:  # noqa: BLE001 - isolate the plugin's bug
                        raise _Rejected(f"raised in its hook {hook_name}()", exc) from exc
                    recs.extend(check_records(hook_name, result))
                except PluginError as exc:
                    self._pm.unregister(name=name)
                    raise _Rejected(f"returned invalid records from {hook_name}()", exc) from exc
                except _Rejected:
                    self._pm.unregister(name=name)
                    raise
            provided[kind] = recs
        return provided

    def _check_conflicts(self, info: PluginInfo, provided: dict[str, list]) -> None:
        for kind, recs in provided.items():
            # an adapter folder or config names one type, whichever its kind: names are shared
            kinds = _ADAPTER_KINDS if kind in _ADAPTER_KINDS else (kind,)
            for rec in recs:
                for other in kinds:
                    if rec.name in self._records[other]:
                        owner = self._infos[self._records[other][rec.name][1]]
                        raise self._conflict(f"{_LABEL[kind]} {rec.name!r}", owner, info)
                if kind != "adapter_types" and any(r.name == rec.name for r in provided.get("adapter_types", [])):
                    raise self._conflict(f"{_LABEL[kind]} {rec.name!r}", info, info)
        seen = {spec.peft_type.upper(): (spec, self._infos[owner])
                for kind in _ADAPTER_KINDS
                for spec, owner in self._records[kind].values() if spec.peft_type}
        for rec in [*provided.get("adapter_types", []), *provided.get("input_adapter_types", [])]:
            if not rec.peft_type:
                continue
            prev = seen.get(rec.peft_type.upper())
            if prev is not None:
                raise self._conflict(f"peft_type {rec.peft_type!r} (adapter types "
                                     f"{prev[0].name!r} and {rec.name!r})", prev[1], info)
            seen[rec.peft_type.upper()] = (rec, info)

    @staticmethod
    def _conflict(what: str, first: PluginInfo, second: PluginInfo) -> PluginConflictError:
        return PluginConflictError(
            f"Two moa plugins both register {what}: {first.describe()} and {second.describe()}. "
            f"Uninstall one of them, or block one with {DISABLE_ENV}={second.name} "
            f"(or {DISABLE_ENV}={first.name}).")

    def _reject(self, info: PluginInfo, rej: _Rejected, strict: bool) -> None:
        error = f"{type(rej.cause).__name__}: {rej.cause}"
        if info.source == "entry point":
            step = (f"Fix or upgrade it, uninstall it (pip uninstall {info.distribution}), or "
                    f"skip it quietly with {DISABLE_ENV}={info.name}.")
        elif info.source == "builtin":
            step = f"This is a bug in moa; {DISABLE_ENV}={info.name} runs moa without it."
        else:
            step = "Fix the plugin object passed to register()."
        message = f"moa {info.describe()} is not loaded: it {rej.what}: {error}. {step}"
        if strict:
            raise PluginError(message) from rej.cause
        self._infos[info.name] = PluginInfo(info.name, info.distribution, info.version,
                                            info.source, "failed", error=error)
        logger.warning("%s", message)
        warnings.warn(message, MoaPluginWarning, stacklevel=4)

    # --- checks and lookups -------------------------------------------------------------

    def check_pending(self) -> None:
        """Check that every registered hook implementation matches a moa hook.

        Raises:
            PluginError: Naming the plugin, the misspelled hook and the valid hook names.
        """
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            bad = unknown_hooks(self._pm, exc.plugin) or ["?"]
            name = self._pm.get_name(exc.plugin)
            hooks = ", ".join(f"{h!r}{hook_suggestion(h)}" for h in bad)
            raise PluginError(
                f"moa plugin {name!r} implements {hooks}, which is not a moa hook. Valid hooks: "
                f"{format_choices(HOOK_KINDS)}. Rename the function (or set the hookimpl's "
                f"specname=...).") from exc

    def list_plugins(self) -> list[PluginInfo]:
        """Every plugin seen: loaded, failed or blocked, built-ins first."""
        return list(self._infos.values())

    def specs(self, kind: str) -> dict[str, Any]:
        """Name -> record of one kind: ``adapter_types``, ``input_adapter_types``, ``routers``, ``merge_strategies``."""
        if kind not in self._records:
            raise UnknownPluginError(f"Unknown plugin kind {kind!r}. Choices: "
                                     f"{format_choices(self._records)}.")
        return {name: rec for name, (rec, _) in sorted(self._records[kind].items())}

    def _lookup(self, kind: str, name: str) -> Any:
        table = self._records[kind]
        if isinstance(name, str) and name in table:
            return table[name][0]
        msg = f"Unknown {_LABEL[kind]} {name!r}. Registered: {format_choices(table)}."
        close = difflib.get_close_matches(str(name), list(table), n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        msg += " Is its plugin installed? Run 'moa plugins'."
        failed = [i.name for i in self._infos.values() if i.status == "failed"]
        blocked = [i.name for i in self._infos.values() if i.status == "blocked"]
        if failed:
            msg += f" Plugins that failed to load: {', '.join(failed)}."
        if blocked:
            msg += f" Blocked by {DISABLE_ENV}: {', '.join(blocked)}."
        raise UnknownPluginError(msg)

    def get_adapter_type(self, name: str) -> AdapterTypeSpec:
        """The adapter type registered as ``name`` (e.g. ``"lora"``).

        Raises:
            UnknownPluginError: Listing the registered adapter types.
        """
        return self._lookup("adapter_types", name)

    def get_router_spec(self, name: str) -> RouterSpec:
        """The :class:`RouterSpec` registered as ``name``.

        Raises:
            UnknownPluginError: Listing the registered routers.
        """
        return self._lookup("routers", name)

    def get_router(self, name: str) -> type:
        """The router class registered as ``name`` (e.g. ``get_router("fixed")({"sql": 1.0})``).

        Raises:
            UnknownPluginError: Listing the registered routers.
        """
        return self.get_router_spec(name).router_class

    def get_merge_strategy(self, name: str) -> MergeStrategySpec:
        """The merge strategy registered as ``name`` (e.g. ``"ties"``).

        Raises:
            UnknownPluginError: Listing the registered merge strategies.
        """
        return self._lookup("merge_strategies", name)

    def get_input_adapter_type(self, name: str) -> InputAdapterTypeSpec:
        """The input-level adapter type registered as ``name`` (e.g. ``"prompt_tuning"``).

        Raises:
            UnknownPluginError: Listing the registered input adapter types.
        """
        return self._lookup("input_adapter_types", name)

    def input_adapter_type_for_peft_type(self, peft_type: Any) -> InputAdapterTypeSpec | None:
        """The input-level adapter type that reads ``peft_type`` (any case), or ``None`` if none does.

        ``None`` means the folder is not an input-level adapter (or its plugin is missing):
        moa then reads it as a Linear-level adapter, which names the PEFT types it knows.
        """
        if not isinstance(peft_type, str):
            return None
        for spec in self.specs("input_adapter_types").values():
            if spec.peft_type and spec.peft_type.upper() == peft_type.upper():
                return spec
        return None

    def adapter_type_for_peft_type(self, peft_type: str) -> AdapterTypeSpec:
        """The adapter type that reads ``peft_type`` (from ``adapter_config.json``), any case.

        Raises:
            UnknownPluginError: Listing the known PEFT types and where others come from.
        """
        known = {spec.peft_type.upper(): spec
                 for spec in self.specs("adapter_types").values() if spec.peft_type}
        key = peft_type.upper() if isinstance(peft_type, str) else None
        if key in known:
            return known[key]
        known.update({spec.peft_type.upper(): spec
                      for spec in self.specs("input_adapter_types").values() if spec.peft_type})
        choices = ", ".join(f"{p} ({s.name})" for p, s in sorted(known.items())) or "(none)"
        raise UnknownPluginError(
            f"No adapter type reads peft_type {peft_type!r}. Known PEFT types: {choices}. "
            f"Other adapter types (DoRA, IA3, VeRA, prompt tuning...) come from plugins: install one "
            f"that provides it, then check 'moa plugins'.")

    def adapter_type_for_config(self, config: Mapping[str, Any]) -> AdapterTypeSpec:
        """The adapter type that reads this ``adapter_config.json`` dict.

        An adapter type may claim configs by content, not just by ``peft_type``: if its
        ``config_class`` defines a classmethod ``accepts(config: Mapping) -> bool``, it is
        asked first, and a type that accepts wins over the plain ``peft_type`` match.
        That is how a variant shares a PEFT type with another adapter type, e.g. DoRA
        (``peft_type`` ``"LORA"`` with ``use_dora: true``) next to the built-in LoRA. Such a
        type usually registers ``peft_type=None``, so it does not conflict with the owner
        of the PEFT type. When no type accepts, this is
        :meth:`adapter_type_for_peft_type` of ``config["peft_type"]``.

        Args:
            config: The parsed ``adapter_config.json``.

        Returns:
            The one accepting type, else the type registered for the config's ``peft_type``.

        Raises:
            PluginConflictError: Two adapter types accept the same config.
            PluginError: An ``accepts`` raised and ``MOA_STRICT_PLUGINS=1`` (otherwise that
                type is skipped with a warning).
            UnknownPluginError: No type accepts and none reads its ``peft_type``.

        Example::

            spec = pm.adapter_type_for_config({"peft_type": "LORA", "use_dora": True})
        """
        accepting: list[AdapterTypeSpec] = []
        for spec in self.specs("adapter_types").values():
            accepts = getattr(spec.config_class, "accepts", None)
            if not callable(accepts):
                continue
            try:
                claimed = bool(accepts(config))
            except Exception as exc:  # noqa: BLE001 - a plugin's bug must not break loading
                owner = self._infos[self._records["adapter_types"][spec.name][1]]
                message = (f"moa {owner.describe()}: {spec.config_class.__name__}.accepts() "
                           f"raised {type(exc).__name__}: {exc}; adapter type {spec.name!r} is "
                           f"skipped for this adapter folder.")
                if self._strict:
                    raise PluginError(message) from exc
                logger.warning("%s", message)
                warnings.warn(message, MoaPluginWarning, stacklevel=2)
                continue
            if claimed:
                accepting.append(spec)
        if len(accepting) > 1:
            owners = [self._infos[self._records["adapter_types"][s.name][1]] for s in accepting]
            raise self._conflict(
                f"an adapter config accepted by adapter types "
                f"{', '.join(repr(s.name) for s in accepting)}", owners[0], owners[1])
        if accepting:
            return accepting[0]
        peft_type = config.get("peft_type")
        return self.adapter_type_for_peft_type(peft_type)  # type: ignore[arg-type]
