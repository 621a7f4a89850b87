"""The data-only wire between the trusted judge and the sandboxed program: one JSON array per line.

Only plain data crosses: None, bool, int, float, complex, str, bytes, list, tuple, dict, set and frozenset, nested
at most MAX_DEPTH deep. Lists are JSON arrays; every other container is a tagged object `{"t": TAG, "v": ...}`, so
`decode` rebuilds the exact builtin types and nothing else: a value that came out of the sandbox has no methods
of its own (no `__eq__` that always says yes), and nothing is unpickled or evaluated. Standard library only: the
sandbox bootstrap imports this file before it confines itself.

JSON text goes through the C scanner and encoder of `_json` directly: `import json` costs an interpreter ~15 ms
(it pulls in `re`), and two interpreters start per test. Should that private module ever change, `json` is used.

    >>> decode(loads(dumps(["return", encode((1, {2: [3.5, None]}, {"x"}))]))[1])
    (1, {2: [3.5, None]}, {'x'})
"""

MAX_DEPTH = 64
BIG_INT_BITS = 12_000  # str(int) refuses past 4300 digits (~14,000 bits): larger ints travel as hex
TAGS = {"tuple": tuple, "set": set, "frozenset": frozenset}


class WireError(ValueError):
    """A message that is not well-formed wire data (from the sandbox: the program's fault)."""


def encode(value, depth: int = 0):
    """`value` as JSON-ready data. Subclasses of the builtin types travel as their builtin base (a namedtuple as a
    tuple); any other type raises TypeError, as it could not be compared on the other side anyway."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or type(value) in (bool, str, float):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, int):
        value = int.__index__(value)
        return value if value.bit_length() < BIG_INT_BITS else {"t": "int", "v": hex(value)}
    if isinstance(value, complex):
        return {"t": "complex", "v": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"t": "bytes", "v": bytes(value).hex()}
    if isinstance(value, list):
        return [encode(v, depth + 1) for v in list.__iter__(value)]
    if isinstance(value, dict):
        return {"t": "dict", "v": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    for tag, kind in TAGS.items():
        if isinstance(value, kind):
            return {"t": tag, "v": [encode(v, depth + 1) for v in kind.__iter__(value)]}
    raise TypeError(f"a {type(value).__name__} cannot cross the sandbox boundary (only plain data can)")


def decode(data, depth: int = 0):
    """Wire data -> a value made of builtin types only. Raises WireError on anything else."""
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is not dict or set(data) != {"t", "v"}:
        raise WireError(f"not wire data: {type(data).__name__}")
    tag, v = data["t"], data["v"]
    try:
        if tag == "int" and type(v) is str:
            return int(v, 16)
        if tag == "bytes" and type(v) is str:
            return bytes.fromhex(v)
        if tag == "complex" and type(v) is list and len(v) == 2 and all(type(x) in (int, float) for x in v):
            return complex(*v)
        if tag == "dict" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
            return {decode(k, depth + 1): decode(x, depth + 1) for k, x in v}
        if tag in TAGS and type(v) is list:
            return TAGS[tag](decode(x, depth + 1) for x in v)
    except (TypeError, ValueError) as e:  # an unhashable key, bad hex
        raise WireError(f"bad {tag!r} value: {e}") from None
    raise WireError(f"unknown or malformed tag {str(tag)[:20]!r}")


def _constant(name: str) -> float:
    return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


def _not_data(value):
    raise TypeError(f"not JSON data: {type(value).__name__}")


try:
    import _json

    class _Decoding:
        """The settings `_json.make_scanner` reads off a `json.JSONDecoder`."""

        strict, object_hook, object_pairs_hook, memo = True, None, None, {}
        parse_float, parse_int, parse_constant = float, int, staticmethod(_constant)

    _scan = _json.make_scanner(_Decoding())
    _encode = _json.make_encoder(None, _not_data, _json.encode_basestring_ascii, None, ":", ",", False, False, True)
except (ImportError, AttributeError, TypeError):  # pragma: no cover - another Python's private module
    import json

    def _scan(text: str, index: int):
        return json.JSONDecoder().raw_decode(text, index)

    def _encode(value, level: int):
        return [json.dumps(value, separators=(",", ":"))]


def to_json(value) -> str:
    """JSON-ready data (see `encode`) as compact JSON text."""
    return "".join(_encode(value, 0))


def from_json(text: str):
    """JSON text -> data. Raises WireError on anything that is not exactly one JSON value."""
    try:
        value, end = _scan(text, 0)
    except (ValueError, RecursionError, StopIteration) as e:
        raise WireError(f"not JSON: {str(e)[:80]}") from None
    if end != len(text):
        raise WireError("not JSON: trailing data")
    return value


def dumps(message) -> bytes:
    """One message (a list of JSON-ready data) as a line of bytes."""
    return to_json(message).encode() + b"\n"


def loads(line: bytes) -> list:
    """A line -> the message list. Raises WireError unless it is a JSON array starting with a string."""
    try:
        text = line.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        raise WireError("not UTF-8") from None
    message = from_json(text)
    if type(message) is not list or not message or type(message[0]) is not str:
        raise WireError("not a message")
    return message
