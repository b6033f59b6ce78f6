"""Parameter schemas of the PF admin methods, and the one validator that applies them.

Rules of this module:

* a parameter is declared once, as a :class:`ParamSpec` (name, kind, range, required or
  optional, documentation); the method table (:mod:`.methods`) is made of them and the
  docs are generated from it, so the wire contract and its documentation cannot drift;
* :func:`parse_params` turns wire values into typed Python values (a WWN string into a
  :class:`~vfdirect.core.wwn.Wwn`, a hex string into ``bytes``, a list into a tuple) or
  raises ``RpcError(INVALID_PARAMS, "<method>: <what is wrong>")``; it never raises
  anything else, whatever the JSON value (claim A4's mapping arrives through here too);
* JSON booleans are never integers here, although ``bool`` is an ``int`` in Python;
* file descriptors are counted, not parsed: a method declares how many it takes, and a
  wrong count is ``RpcError(BAD_FDS, ...)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vfdirect.core.fabric.zoning import check_zone_name
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.wwn import Wwn, WwnError


class ParamKind(StrEnum):
    """Wire type of a parameter (the docs show these names)."""

    INT = "integer"
    BOOL = "boolean"
    STR = "string"
    #: A name: letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit.
    NAME = "name"
    #: A WWN in any text form :meth:`Wwn.parse` accepts; parsed to :class:`Wwn`.
    WWN = "wwn"
    #: A zone name (FC-GS rules, :func:`~vfdirect.core.fabric.zoning.check_zone_name`).
    ZONE = "zone name"
    #: An absolute path.
    PATH = "path"
    #: Bytes as an even number of hex digits; parsed to ``bytes``.
    HEX = "hex"
    #: One of :attr:`ParamSpec.choices`.
    ENUM = "enum"
    #: A JSON object, checked further by the method (e.g. a mapping table).
    OBJECT = "object"
    #: A list of WWNs; parsed to ``tuple[Wwn, ...]``.
    WWN_LIST = "list of wwn"
    #: A list of integers in ``[minimum, maximum]``; parsed to ``tuple[int, ...]``.
    INT_LIST = "list of integer"
    #: A scatter list: ``[[offset, length], ...]``; parsed to ``tuple[tuple[int, int], ...]``.
    SG_LIST = "scatter list"


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One by-name parameter of a method."""

    name: str
    kind: ParamKind
    doc: str
    required: bool = True
    #: INT, INT_LIST items, SG_LIST offsets and lengths: inclusive bounds.
    minimum: int | None = None
    maximum: int | None = None
    #: STR, NAME, PATH: longest text; HEX: most bytes.
    max_len: int | None = None
    #: HEX: fewest bytes.
    min_len: int = 0
    #: lists: fewest and most items.
    min_items: int = 0
    max_items: int | None = None
    #: ENUM: allowed values.
    choices: tuple[str, ...] = ()
    #: Value of an optional parameter that is absent (already in its parsed form).
    default: Any = None

    def describe(self) -> str:
        """The type and range, as the docs print them."""
        kind = self.kind
        if kind is ParamKind.INT:
            return f"integer {self.minimum}..{self.maximum}"
        if kind is ParamKind.ENUM:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if kind is ParamKind.HEX:
            return f"hex, {self.min_len}..{self.max_len} bytes"
        if kind in (ParamKind.STR, ParamKind.NAME, ParamKind.PATH):
            return f"{kind.value}, at most {self.max_len} characters"
        if kind is ParamKind.INT_LIST:
            return (f"list of {self.min_items}..{self.max_items} integers "
                    f"{self.minimum}..{self.maximum}")
        if kind is ParamKind.SG_LIST:
            return f"list of {self.min_items}..{self.max_items} [offset, length] pairs"
        if kind is ParamKind.WWN_LIST:
            return f"list of {self.min_items}..{self.max_items} WWNs"
        return kind.value


@dataclass(frozen=True, slots=True)
class FdSpec:
    """How many file descriptors (SCM_RIGHTS) a request or its reply carries."""

    minimum: int = 0
    maximum: int = 0
    doc: str = ""

    def describe(self) -> str:
        if self.maximum == 0:
            return "none"
        count = (str(self.minimum) if self.minimum == self.maximum
                 else f"{self.minimum}..{self.maximum}")
        return f"{count}: {self.doc}" if self.doc else count


def _bad(method: str, message: str) -> RpcError:
    return RpcError(ErrorCode.INVALID_PARAMS, f"{method}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(method: str, what: str, value: object, lo: int | None, hi: int | None) -> int:
    if not _is_int(value):
        raise _bad(method, f"{what} must be an integer, not {_show(value)}")
    assert isinstance(value, int)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(method, f"{what} must be in {lo}..{hi}, not {value}")
    return value


def _show(value: object) -> str:
    """A short rendering of a wire value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_list(method: str, spec: ParamSpec, value: object) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(method, f"parameter {spec.name!r} must be a list, not {_show(value)}")
    hi = spec.max_items
    if len(value) < spec.min_items or (hi is not None and len(value) > hi):
        raise _bad(method, f"parameter {spec.name!r} must have {spec.min_items}..{hi} items, "
                           f"not {len(value)}")
    return value


def _parse_wwn(method: str, what: str, value: object) -> Wwn:
    if not isinstance(value, str):
        raise _bad(method, f"{what} must be a WWN string, not {_show(value)}")
    try:
        return Wwn.parse(value)
    except WwnError as exc:
        raise _bad(method, f"{what}: {exc}") from None


def parse_value(method: str, spec: ParamSpec, value: object) -> Any:
    """``value`` checked against ``spec`` and converted; ``RpcError`` otherwise."""
    what = f"parameter {spec.name!r}"
    kind = spec.kind
    if kind is ParamKind.INT:
        return _check_int(method, what, value, spec.minimum, spec.maximum)
    if kind is ParamKind.BOOL:
        if not isinstance(value, bool):
            raise _bad(method, f"{what} must be true or false, not {_show(value)}")
        return value
    if kind is ParamKind.OBJECT:
        if not isinstance(value, dict):
            raise _bad(method, f"{what} must be an object, not {_show(value)}")
        return value
    if kind is ParamKind.WWN:
        return _parse_wwn(method, what, value)
    if kind is ParamKind.WWN_LIST:
        items = _check_list(method, spec, value)
        wwns = tuple(_parse_wwn(method, f"{what}[{i}]", v) for i, v in enumerate(items))
        if len(set(wwns)) != len(wwns):
            raise _bad(method, f"{what} names a WWN twice")
        return wwns
    if kind is ParamKind.INT_LIST:
        items = _check_list(method, spec, value)
        ints = tuple(_check_int(method, f"{what}[{i}]", v, spec.minimum, spec.maximum)
                     for i, v in enumerate(items))
        if len(set(ints)) != len(ints):
            raise _bad(method, f"{what} names a value twice")
        return ints
    if kind is ParamKind.SG_LIST:
        items = _check_list(method, spec, value)
        pairs: list[tuple[int, int]] = []
        for i, item in enumerate(items):
            if not isinstance(item, list) or len(item) != 2:
                raise _bad(method, f"{what}[{i}] must be an [offset, length] pair, "
                                   f"not {_show(item)}")
            off = _check_int(method, f"{what}[{i}] offset", item[0], 0, spec.maximum)
            length = _check_int(method, f"{what}[{i}] length", item[1], 1, spec.maximum)
            pairs.append((off, length))
        return tuple(pairs)
    if not isinstance(value, str):
        raise _bad(method, f"{what} must be a string, not {_show(value)}")
    if kind is ParamKind.ENUM:
        if value not in spec.choices:
            raise _bad(method, f"{what} must be one of {', '.join(spec.choices)}, "
                               f"not {_show(value)}")
        return value
    if kind is ParamKind.ZONE:
        try:
            return check_zone_name(value)
        except ValueError as exc:
            raise _bad(method, str(exc)) from None
    if kind is ParamKind.HEX:
        if len(value) % 2 or not all(c in "0123456789abcdefABCDEF" for c in value):
            raise _bad(method, f"{what} must be an even number of hex digits, not {_show(value)}")
        raw = bytes.fromhex(value)
        hi = spec.max_len
        if len(raw) < spec.min_len or (hi is not None and len(raw) > hi):
            raise _bad(method, f"{what} must be {spec.min_len}..{hi} bytes, not {len(raw)}")
        return raw
    if spec.max_len is not None and len(value) > spec.max_len:
        raise _bad(method, f"{what} is longer than {spec.max_len} characters")
    if not value:
        raise _bad(method, f"{what} must not be empty")
    if "\x00" in value:
        raise _bad(method, f"{what} must not contain NUL")
    if kind is ParamKind.NAME and not _NAME.match(value):
        raise _bad(method, f"{what} {_show(value)}: letters, digits, '.', '_' and '-', "
                           "starting with a letter or digit")
    if kind is ParamKind.PATH and not value.startswith("/"):
        raise _bad(method, f"{what} must be an absolute path, not {_show(value)}")
    return value


def parse_params(
    method: str, specs: tuple[ParamSpec, ...], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Every declared parameter, parsed (optional ones absent get their default);
    unknown or missing parameters are refused, naming the parameters the method takes."""
    known = {s.name for s in specs}
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        takes = ", ".join(s.name for s in specs) or "no parameters"
        raise _bad(method, f"unknown parameter {unknown[0]!r} (it takes: {takes})")
    out: dict[str, Any] = {}
    for spec in specs:
        if spec.name in params:
            out[spec.name] = parse_value(method, spec, params[spec.name])
        elif spec.required:
            raise _bad(method, f"missing required parameter {spec.name!r}")
        else:
            out[spec.name] = spec.default
    return out


def check_fd_count(method: str, fds: FdSpec, count: int) -> None:
    if not fds.minimum <= count <= fds.maximum:
        want = (str(fds.minimum) if fds.minimum == fds.maximum
                else f"{fds.minimum}..{fds.maximum}")
        raise RpcError(ErrorCode.BAD_FDS,
                       f"{method} takes {want} file descriptor(s), the request carried {count}")
