"""How a shard index stores the caller's per-sample metadata in Parquet columns.

    str -> string; bool -> bool; int -> int64; float (or ints mixed with floats) -> float64;
    a list of ints, or lists of lists of ints (any fixed depth) -> list<int64> / list<list<int64>>;
    anything else (dicts, lists holding non-ints, ...) -> a JSON string column whose Arrow field
    carries metadata {"alignti.encoding": "json"}; the reader decodes it back.
    None is a null in any column. Types are inferred per shard; pass `meta_schema` to the writer to
    pin them (so all shards agree, e.g. list<int32> for token ids). In a pinned schema, mark a JSON
    column with `json_field(name)`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

JSON_ENCODING_KEY = b"alignti.encoding"
JSON_ENCODING_VALUE = b"json"


def json_field(name: str) -> pa.Field:
    """A meta column stored as JSON text (for a pinned `meta_schema`)."""
    return pa.field(name, pa.string(), metadata={JSON_ENCODING_KEY: JSON_ENCODING_VALUE})


# A kind is one of: None (only nulls so far), "bool", "int", "float", "str", "json",
# or ("ints", depth, exact): nested lists of ints `depth` deep; exact=False when only empty
# lists were seen at the bottom, so the depth is a lower bound.


def _int_list_kind(v: list) -> tuple | None:
    """('ints', depth, exact) if v is a (nested) list of ints of one depth, else None."""
    if len(v) == 0:
        return ("ints", 1, False)
    kinds = set()
    child: tuple | None = None
    for x in v:
        if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
            kinds.add("leaf")
        elif isinstance(x, list):
            k = _int_list_kind(x)
            if k is None:
                return None
            kinds.add("list")
            child = k if child is None else _merge_int_lists(child, k)
            if child is None:
                return None
        else:
            return None
    if kinds == {"leaf"}:
        return ("ints", 1, True)
    if kinds == {"list"}:
        assert child is not None
        return ("ints", child[1] + 1, child[2])
    return None


def _merge_int_lists(a: tuple, b: tuple) -> tuple | None:
    _, da, ea = a
    _, db, eb = b
    if ea and eb:
        return a if da == db else None
    if ea:
        return a if db <= da else None
    if eb:
        return b if da <= db else None
    return ("ints", max(da, db), False)


def _value_kind(v: Any):
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        k = _int_list_kind(v)
        return k if k is not None else "json"
    return "json"


def _merge_kinds(a, b):
    """Merged kind, or raise ValueError when the two cannot share a column."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    if {a, b} == {"int", "float"}:
        return "float"
    if isinstance(a, tuple) and isinstance(b, tuple):
        m = _merge_int_lists(a, b)
        if m is not None:
            return m
    raise ValueError(f"{_kind_name(b)} does not fit the column's earlier {_kind_name(a)}")


def _kind_name(k) -> str:
    if isinstance(k, tuple):
        return "list[" * k[1] + "int" + "]" * k[1]
    if k == "json":
        return "nested value (JSON)"
    return str(k)


def _kind_field(name: str, k) -> pa.Field:
    if k is None:
        return pa.field(name, pa.null())
    if k == "json":
        return json_field(name)
    if isinstance(k, tuple):
        t: pa.DataType = pa.int64()
        for _ in range(k[1]):
            t = pa.list_(t)
        return pa.field(name, t)
    return pa.field(name, {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(),
                           "str": pa.string()}[k])


def _is_json_field(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(JSON_ENCODING_KEY) == JSON_ENCODING_VALUE


def _to_jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"value of type {type(v).__name__} is not JSON-serialisable")


def _json_text(v: Any) -> str | None:
    if v is None:
        return None
    return json.dumps(v, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      default=_to_jsonable)


def _reserved_column(name: str) -> bool:
    return name == "sample_id" or name.endswith(".start") or name.endswith(".len")
