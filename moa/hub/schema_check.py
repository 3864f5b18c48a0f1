"""A small JSON Schema (draft 2020-12) checker for the registry's schemas.

It implements the keywords ``registry/schema/*.schema.json`` use — ``type``, ``enum``,
``const``, ``properties``, ``required``, ``additionalProperties``, ``patternProperties``,
``propertyNames``, ``minProperties``, ``items``, ``minItems``, ``maxItems``,
``uniqueItems``, ``pattern``, ``minLength``, ``maxLength``, ``minimum``, ``maximum``,
``exclusiveMinimum``, ``anyOf``, ``oneOf``, ``not``, ``$ref`` (``#/$defs/...``) — and ignores annotations
(``title``, ``description``, ``examples``, ``default``, ``format``...). A schema using any
other keyword is rejected, so a schema never silently means more than is checked.
Being dependency-free keeps ``moa registry verify`` working wherever moa is installed.

Example::

    errors = validate({"name": 3}, {"type": "object", "properties": {"name": {"type": "string"}}})
    # ['/name: 3 is not of type string']
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "$defs", "title", "description", "examples", "default",
                          "format", "deprecated", "readOnly", "writeOnly"})
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaDefinitionError(ValueError):
    """The schema itself uses a keyword or value this checker does not implement."""


def validate(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
             path: str = "") -> list[str]:
    """Every way ``instance`` breaks ``schema``, as ``"/json/pointer: message"`` strings.

    Raises:
        SchemaDefinitionError: the schema uses an unsupported keyword.
    """
    root = schema if root is None else root
    errors: list[str] = []
    where = path or "/"
    for key, rule in schema.items():
        if key in _ANNOTATIONS:
            continue
        check = _KEYWORDS.get(key)
        if check is None:
            raise SchemaDefinitionError(f"Unsupported JSON Schema keyword {key!r} at {where}.")
        errors += check(instance, rule, schema, root, path)
    return errors


def _ref(instance: Any, rule: str, schema: Mapping, root: Mapping, path: str) -> list[str]:
    if not rule.startswith("#/"):
        raise SchemaDefinitionError(f"Only local $ref ('#/$defs/...') is supported, got {rule!r}.")
    target: Any = root
    for part in rule[2:].split("/"):
        target = target[part]
    return validate(instance, target, root, path)


def _type(instance: Any, rule: Any, schema: Mapping, root: Mapping, path: str) -> list[str]:
    names = [rule] if isinstance(rule, str) else list(rule)
    if any(_TYPES[name](instance) for name in names):
        return []
    return [f"{path or '/'}: {instance!r} is not of type {' or '.join(names)}"]


def _object_rules(instance: Any, schema: Mapping, root: Mapping, path: str) -> list[str]:
    errors: list[str] = []
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extra = schema.get("additionalProperties", True)
    for name in schema.get("required", []):
        if name not in instance:
            errors.append(f"{path or '/'}: missing required property {name!r}")
    if len(instance) < schema.get("minProperties", 0):
        errors.append(f"{path or '/'}: needs at least {schema['minProperties']} properties")
    for name, value in instance.items():
        child = f"{path}/{name}"
        if "propertyNames" in schema:
            errors += [f"{child}: property name {e.split(': ', 1)[-1]}"
                       for e in validate(name, schema["propertyNames"], root, child)]
        matched = False
        if name in properties:
            matched = True
            errors += validate(value, properties[name], root, child)
        for pattern, subschema in patterns.items():
            if re.search(pattern, name):
                matched = True
                errors += validate(value, subschema, root, child)
        if not matched:
            if extra is False:
                errors.append(f"{child}: unexpected property (allowed: {', '.join(sorted(properties))})")
            elif isinstance(extra, Mapping):
                errors += validate(value, extra, root, child)
    return errors


def _array_rules(instance: Any, schema: Mapping, root: Mapping, path: str) -> list[str]:
    errors: list[str] = []
    if len(instance) < schema.get("minItems", 0):
        errors.append(f"{path or '/'}: needs at least {schema['minItems']} items")
    if "maxItems" in schema and len(instance) > schema["maxItems"]:
        errors.append(f"{path or '/'}: has more than {schema['maxItems']} items")
    if schema.get("uniqueItems") and len({repr(v) for v in instance}) != len(instance):
        errors.append(f"{path or '/'}: items must be unique")
    if "items" in schema:
        for index, value in enumerate(instance):
            errors += validate(value, schema["items"], root, f"{path}/{index}")
    return errors


def _string_rules(instance: Any, schema: Mapping, path: str) -> list[str]:
    errors: list[str] = []
    if "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{path or '/'}: {instance!r} does not match {schema['pattern']!r}")
    if len(instance) < schema.get("minLength", 0):
        errors.append(f"{path or '/'}: {instance!r} is shorter than {schema['minLength']}")
    if "maxLength" in schema and len(instance) > schema["maxLength"]:
        errors.append(f"{path or '/'}: {instance!r} is longer than {schema['maxLength']}")
    return errors


def _number_rules(instance: Any, schema: Mapping, path: str) -> list[str]:
    errors: list[str] = []
    if "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{path or '/'}: {instance!r} is less than {schema['minimum']}")
    if "maximum" in schema and instance > schema["maximum"]:
        errors.append(f"{path or '/'}: {instance!r} is more than {schema['maximum']}")
    if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
        errors.append(f"{path or '/'}: {instance!r} must be more than {schema['exclusiveMinimum']}")
    return errors


def _by_kind(instance: Any, rule: Any, schema: Mapping, root: Mapping, path: str) -> list[str]:
    """Object/array/string/number keywords, run once per schema (keyed on the first one seen)."""
    if isinstance(instance, dict):
        return _object_rules(instance, schema, root, path)
    if isinstance(instance, list):
        return _array_rules(instance, schema, root, path)
    if isinstance(instance, str):
        return _string_rules(instance, schema, path)
    if _TYPES["number"](instance):
        return _number_rules(instance, schema, path)
    return []


def _short(instance: Any, limit: int = 60) -> str:
    """``repr(instance)``, cut to ``limit`` characters for messages."""
    text = repr(instance)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _form(subschema: Mapping[str, Any], index: int) -> str:
    """How an error names one alternative of ``oneOf``: its ``title``, else its position."""
    return str(subschema.get("title") or f"form {index + 1}")


def _one_of(instance: Any, rule: list[Mapping[str, Any]], schema: Mapping, root: Mapping, path: str) -> list[str]:
    """Exactly one alternative must match; the error names each one and why it did not (or that several did)."""
    outcomes = [validate(instance, sub, root, path) for sub in rule]
    matched = [_form(sub, i) for i, (sub, errors) in enumerate(zip(rule, outcomes, strict=True)) if not errors]
    if len(matched) == 1:
        return []
    if matched:
        return [f"{path or '/'}: {_short(instance)} matches more than one of the allowed forms ({', '.join(matched)})"]
    here = f"{path or '/'}: "
    reasons = "; ".join(
        f"{_form(sub, i)}: {', '.join(e.removeprefix(here) for e in errors)}" for i, (sub, errors) in
        enumerate(zip(rule, outcomes, strict=True))
    )
    return [f"{path or '/'}: matches none of the allowed forms ({reasons})"]


def _not(instance: Any, rule: Mapping[str, Any], schema: Mapping, root: Mapping, path: str) -> list[str]:
    """The subschema must fail; its ``description`` (if any) says what is forbidden."""
    if validate(instance, rule, root, path):
        return []
    what = rule.get("description") or f"match {_short(dict(rule))}"
    return [f"{path or '/'}: must not {what}"]


def _once(instance: Any, rule: Any, schema: Mapping, root: Mapping, path: str, key: str = "") -> list[str]:
    first = next(k for k in schema if k in _KIND_KEYWORDS)
    return _by_kind(instance, rule, schema, root, path) if key == first else []


_KIND_KEYWORDS = ("properties", "required", "additionalProperties", "patternProperties", "propertyNames",
                  "minProperties", "items", "minItems", "maxItems", "uniqueItems", "pattern", "minLength",
                  "maxLength", "minimum", "maximum", "exclusiveMinimum")
_KEYWORDS: dict[str, Any] = {
    "$ref": _ref,
    "type": _type,
    "enum": lambda i, r, s, root, p: [] if i in r else [f"{p or '/'}: {i!r} is not one of {r!r}"],
    "const": lambda i, r, s, root, p: [] if i == r else [f"{p or '/'}: {i!r} must be {r!r}"],
    "anyOf": lambda i, r, s, root, p: [] if any(not validate(i, sub, root, p) for sub in r)
    else [f"{p or '/'}: {i!r} matches none of the allowed forms"],
    "oneOf": _one_of,
    "not": _not,
    **{k: (lambda key: lambda i, r, s, root, p: _once(i, r, s, root, p, key))(k) for k in _KIND_KEYWORDS},
}


__all__ = ["SchemaDefinitionError", "validate"]
