"""JSON Schema validation of registry entries, with short messages that name the offending field.

Validation itself is the maintained ``jsonschema`` library (the draft named by the schema's
``$schema``, else draft 2020-12); this module only turns its errors into one line each,
``"/json/pointer: problem"``, e.g. ``/files/x.bin: property name 'x.bin' does not match ...``
or ``/: missing required property 'name'``. A ``oneOf``/``anyOf`` that nothing matches says
why each alternative (named by its ``title``) failed; a ``not`` says what is forbidden
through the subschema's ``description``.

Example::

    errors = validate({"name": 3}, {"type": "object", "properties": {"name": {"type": "string"}}})
    # ['/name: 3 is not of type string']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import exceptions as jsonschema_exceptions
from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator, validator_for


class SchemaDefinitionError(ValueError):
    """The schema itself is not a valid JSON Schema (for the draft it declares)."""


def validate(instance: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every way ``instance`` breaks ``schema``, as ``"/json/pointer: message"`` strings.

    Args:
        instance: The decoded JSON/TOML document to check.
        schema: A JSON Schema; its ``$schema`` picks the draft (default 2020-12). Local
            ``$ref`` (``#/$defs/...``) resolves against ``schema`` itself.

    Returns:
        One message per problem, ordered by the offending field's path; empty when valid.

    Raises:
        SchemaDefinitionError: ``schema`` is not a valid JSON Schema.
    """
    validator_class = validator_for(schema, default=Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except jsonschema_exceptions.SchemaError as error:
        where = "/" + "/".join(str(part) for part in error.absolute_path)
        raise SchemaDefinitionError(
            f"The JSON Schema is invalid at {where} ({error.validator!r}: {error.message}). Fix the schema "
            f"file; see https://json-schema.org/draft/2020-12 for the keywords."
        ) from error
    validator = validator_class(schema)
    found = [item for error in validator.iter_errors(instance) for item in _describe(validator, error)]
    found.sort(key=lambda item: item[0])
    return list(dict.fromkeys(message for _, message in found))


# --- turning jsonschema's errors into one-line messages ----------------------------------

_Item = tuple[tuple[str, ...], str]  # (path parts, for ordering; message)


def _pointer(parts: Iterable[Any]) -> str:
    return "".join(f"/{part}" for part in parts)


def _short(instance: Any, limit: int = 60) -> str:
    """``repr(instance)``, cut to ``limit`` characters for messages."""
    text = repr(instance)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _form(subschema: Any, index: int) -> str:
    """How a message names one alternative of ``oneOf``/``anyOf``: its ``title``, else its position."""
    title = subschema.get("title") if isinstance(subschema, Mapping) else None
    return str(title or f"form {index + 1}")


def _describe(validator: Validator, error: jsonschema_exceptions.ValidationError) -> list[_Item]:
    """The message(s) for one jsonschema error (``additionalProperties: false`` gives one per extra)."""
    parts = tuple(str(part) for part in error.absolute_path)
    where = _pointer(parts) or "/"
    keyword, rule, value = error.validator, error.validator_value, error.instance
    if "propertyNames" in error.relative_schema_path:  # jsonschema reports these on the object
        child = (*parts, str(value))
        inner = _message(validator, error, keyword, rule, value, _pointer(child))
        return [(child, f"{_pointer(child)}: property name {inner}")]
    if keyword == "additionalProperties" and rule is False and isinstance(value, Mapping):
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        patterns = list(error.schema.get("patternProperties", {}))
        extras = [name for name in value if name not in error.schema.get("properties", {})
                  and not any(re.search(pattern, name) for pattern in patterns)]
        return [((*parts, name), f"{_pointer((*parts, name))}: unexpected property (allowed: {allowed})")
                for name in extras]
    if keyword == "required" and isinstance(value, Mapping):
        missing = [name for name in rule if name not in value]
        return [(parts, f"{where}: missing required property {name!r}") for name in missing]
    return [(parts, f"{where}: {_message(validator, error, keyword, rule, value, where)}")]


def _message(
    validator: Validator, error: jsonschema_exceptions.ValidationError, keyword: Any, rule: Any, value: Any,
    where: str,
) -> str:
    """The problem part of a message (what follows ``"/pointer: "``)."""
    simple = {
        "type": lambda: f"{value!r} is not of type {' or '.join([rule] if isinstance(rule, str) else rule)}",
        "enum": lambda: f"{value!r} is not one of {rule!r}",
        "const": lambda: f"{value!r} must be {rule!r}",
        "minProperties": lambda: f"needs at least {rule} properties",
        "maxProperties": lambda: f"has more than {rule} properties",
        "minItems": lambda: f"needs at least {rule} items",
        "maxItems": lambda: f"has more than {rule} items",
        "uniqueItems": lambda: "items must be unique",
        "pattern": lambda: f"{value!r} does not match {rule!r}",
        "minLength": lambda: f"{value!r} is shorter than {rule}",
        "maxLength": lambda: f"{value!r} is longer than {rule}",
        "minimum": lambda: f"{value!r} is less than {rule}",
        "maximum": lambda: f"{value!r} is more than {rule}",
        "exclusiveMinimum": lambda: f"{value!r} must be more than {rule}",
        "exclusiveMaximum": lambda: f"{value!r} must be less than {rule}",
    }
    if keyword in simple:
        return simple[keyword]()
    if keyword == "not":
        what = rule.get("description") if isinstance(rule, Mapping) else None
        return f"must not {what or f'match {_short(dict(rule) if isinstance(rule, Mapping) else rule)}'}"
    if keyword in ("oneOf", "anyOf"):
        return _alternatives(validator, error, rule, value, where)
    return error.message  # any other keyword: jsonschema's own wording


def _alternatives(
    validator: Validator, error: jsonschema_exceptions.ValidationError, rule: list[Any], value: Any, where: str
) -> str:
    """``oneOf``/``anyOf``: why each alternative failed, or which several matched (``oneOf``)."""
    if not error.context:  # oneOf with more than one match: jsonschema gives no sub-errors
        matched = [_form(sub, i) for i, sub in enumerate(rule) if not any(True for _ in validator.descend(value, sub))]
        return f"{_short(value)} matches more than one of the allowed forms ({', '.join(matched)})"
    by_form: dict[int, list[str]] = {}
    here = f"{where}: "
    for sub_error in error.context:
        index = sub_error.relative_schema_path[0]
        by_form.setdefault(int(index), []).extend(
            message.removeprefix(here) for _, message in _describe(validator, sub_error)
        )
    reasons = "; ".join(
        f"{_form(rule[index], index)}: {', '.join(dict.fromkeys(messages))}"
        for index, messages in sorted(by_form.items())
    )
    return f"matches none of the allowed forms ({reasons})"


__all__ = ["SchemaDefinitionError", "validate"]
