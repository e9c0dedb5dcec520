"""Checks of ``POST /predict`` bodies: every malformed request gets a 4xx and a one-line reason.

The checks run in the HTTP process before a request is queued (see
:class:`nasforge.serve.middleware.RequestValidator`), so a bad request never reaches, or fails,
the batch it would have joined. Parsing is where hostile input does damage: Python's ``json``
recurses once per ``[``/``{``, so a few kilobytes of ``[[[[…`` end in ``RecursionError``. The
body's bracket nesting is therefore measured first, by a vectorised scan that skips string
contents exactly as a JSON parser does, and a body nested deeper than a request can be is
rejected before any parser sees it. The same scan finds ``true``/``false``/``null`` literals:
``json`` hands booleans over as Python ``bool``, which NumPy silently reads as ``1.0``/``0.0``
among numbers.

A request is ``{"inputs": [sample, ...]}`` and nothing else; each sample a nested list of
numbers of the model's per-sample shape. The body is read as UTF-8 JSON whatever its
``Content-Type`` says (``curl -d`` sends ``application/x-www-form-urlencoded``), except
``multipart/*`` and a charset other than UTF-8, which get 415.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import numpy as np

# JSON's own whitespace (RFC 8259); bytes.strip() would also strip \x0b and \x0c.
JSON_WHITESPACE = b" \t\n\r"
_UTF8_CHARSETS = {"utf-8", "utf8", "us-ascii", "ascii"}
_REQUEST = '{"inputs": [sample, ...]}'


class BadRequest(NamedTuple):
    """Why a request is refused: HTTP status and a one-line message."""

    status: int
    message: str


@dataclasses.dataclass(frozen=True)
class RequestRules:
    """What a ``POST /predict`` body must look like.

    Attributes:
        input_shape: Per-sample shape without batch, e.g. ``(3, 32, 32)``.
        max_items: Most samples one request may carry.
        dtype: The models' input dtype; values it cannot hold are refused.
    """

    input_shape: tuple[int, ...]
    max_items: int
    dtype: Any = np.float32

    @property
    def max_depth(self) -> int:
        """Deepest bracket nesting of a valid body: the object, the sample list, the sample."""
        return 2 + len(self.input_shape)


def check_content_type(value: bytes | None) -> BadRequest | None:
    """Refuse media types a JSON body cannot have; ``None`` when the body is read as JSON.

    Args:
        value: The raw ``Content-Type`` header, ``None`` when absent.
    """
    if value is None:
        return None
    text = value.decode("latin-1")
    media, *params = (p.strip() for p in text.split(";"))
    if media.lower().startswith("multipart/"):
        return BadRequest(415, f"Content-Type {media} is not accepted; send the body as JSON")
    for p in params:
        key, _, val = p.partition("=")
        charset = val.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in _UTF8_CHARSETS:
            return BadRequest(415, f"charset {charset!r} is not accepted; JSON bodies are UTF-8")
    return None


# Byte classes the structure scan looks at; every other byte is 0.
_OPEN, _CLOSE, _QUOTE, _BACKSLASH, _LITERAL = 1, 2, 3, 4, 5
_CLASS = np.zeros(256, dtype=np.int8)
_CLASS[[ord("["), ord("{")]] = _OPEN
_CLASS[[ord("]"), ord("}")]] = _CLOSE
_CLASS[ord('"')] = _QUOTE
_CLASS[ord("\\")] = _BACKSLASH
_CLASS[[ord("t"), ord("f"), ord("n")]] = _LITERAL  # first letters of true, false, null


def json_structure(body: bytes) -> tuple[int, bool]:
    """Deepest ``[``/``{`` nesting outside strings, and whether a literal (``true``, ``false``,
    ``null``) occurs outside strings.

    Valid up to the first syntax error: a string is what lies between two unescaped quotes, a
    quote being escaped when an odd run of backslashes precedes it, which is how a JSON parser
    reads a body as far as the body is valid JSON. The literal flag is exact for valid JSON (a
    number has no ``t``, ``f`` or ``n``). Vectorised, linear in the body: a request body, whose
    only marked bytes are brackets (and exponents' ``e``), is scanned at the few bytes that
    matter (4 MB of 64 CIFAR-sized samples in a fraction of its ``json.loads`` time); a body
    dense with them (hostile, or not a request) as whole arrays.

    Args:
        body: The raw request body.

    Returns:
        ``(max_depth, has_literal)``.
    """
    b = np.frombuffer(body, dtype=np.uint8)
    # Every byte of interest is '"' or from '[' up (brackets, backslash, letters).
    marked = (b == ord('"')) | (b >= ord("["))
    if np.count_nonzero(marked) * 8 <= b.size:
        pos = np.flatnonzero(marked)
        kind = _CLASS[b[pos]]
        pos, kind = pos[kind != 0], kind[kind != 0]
        quotes = pos[kind == _QUOTE]
        if quotes.size:
            quotes = quotes[~np.isin(quotes, _escaped(pos[kind == _BACKSLASH]))]
        # A byte is inside a string when an odd number of real quotes precede it.
        outside = np.searchsorted(quotes, pos) % 2 == 0
        steps = np.where(kind == _OPEN, 1, np.where(kind == _CLOSE, -1, 0))[outside]
        literal = bool((kind[outside] == _LITERAL).any())
    else:
        quote = b == ord('"')
        if quote.any():
            escaped = _escaped(np.flatnonzero(b == ord("\\")))
            quote[escaped[escaped < b.size]] = False
        # 1 from an opening quote up to (not including) its closing quote.
        outside = np.bitwise_xor.accumulate(quote.view(np.uint8)) == 0
        opens = (b == ord("[")) | (b == ord("{"))
        closes = (b == ord("]")) | (b == ord("}"))
        steps = (opens.view(np.int8) - closes.view(np.int8)) * outside
        letters = (b == ord("t")) | (b == ord("f")) | (b == ord("n"))
        literal = bool((letters & outside).any())
    depth = int(np.cumsum(steps, dtype=np.int32).max()) if steps.size else 0
    return max(depth, 0), literal


def _escaped(backslashes: np.ndarray) -> np.ndarray:
    """Positions right after an odd run of consecutive backslashes (``backslashes``: sorted
    positions of every backslash)."""
    if not backslashes.size:
        return backslashes
    breaks = np.flatnonzero(np.diff(backslashes) != 1)
    ends = np.append(backslashes[breaks], backslashes[-1])
    starts = np.insert(backslashes[breaks + 1], 0, backslashes[0])
    return (ends + 1)[(ends - starts) % 2 == 0]


class _NonFinite(ValueError):
    """``NaN``/``Infinity``: Python's ``json`` reads them, JSON has no such numbers."""


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


def check_body(body: bytes, rules: RequestRules) -> BadRequest | None:
    """Check a ``POST /predict`` body.

    Args:
        body: The raw request body (size already checked).
        rules: The shape, item limit and dtype requests must fit.

    Returns:
        ``None`` for a body the model can run, else the status and message to answer with:
        400 for a body that is not a JSON object ``{"inputs": [...]}``, 413 for too many
        samples, 422 for samples that are not finite numbers of the model's shape.
    """
    stripped = body.strip(JSON_WHITESPACE)
    if not stripped:
        return BadRequest(400, f"empty body; send a JSON object {_REQUEST}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRequest(400, f"body is not UTF-8 text (JSON is UTF-8): byte {e.start} is bad")
    if not stripped.startswith(b"{"):
        return BadRequest(400, f"body must be a JSON object {_REQUEST}")
    want = list(rules.input_shape)
    depth, literal = json_structure(body)
    if depth > rules.max_depth:
        return BadRequest(
            422,
            f"body nests {depth} levels of arrays/objects; a request {_REQUEST} with samples "
            f"of shape {want} nests {rules.max_depth}",
        )
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except _NonFinite as e:
        return BadRequest(422, f"inputs contain {e}; only finite numbers are accepted")
    except ValueError as e:  # JSONDecodeError, or an integer literal over 4300 digits
        return BadRequest(400, f"body is not valid JSON: {e}")
    if not isinstance(doc, dict) or "inputs" not in doc:
        return BadRequest(400, f'body must be a JSON object with key "inputs": {_REQUEST}')
    unknown = sorted(k for k in doc if k != "inputs")
    if unknown:
        return BadRequest(400, f"unknown key(s) {unknown}; a request is {_REQUEST} only")
    inputs = doc["inputs"]
    if not isinstance(inputs, list) or not inputs:
        return BadRequest(400, '"inputs" must be a non-empty list of samples')
    if len(inputs) > rules.max_items:
        return BadRequest(413, f"{len(inputs)} samples in one request; at most {rules.max_items}")
    if literal:
        return BadRequest(422, "inputs must be numbers, not true/false/null")
    return _check_samples(inputs, want, np.dtype(rules.dtype))


def _check_samples(inputs: list[Any], want: list[int], dtype: np.dtype) -> BadRequest | None:
    try:
        arr = np.asarray(inputs)
    except ValueError:
        return BadRequest(422, f"samples are ragged nested lists; each must have shape {want}")
    if arr.dtype.kind == "O":  # integers beyond int64, or objects among the numbers
        try:
            arr = np.asarray(inputs, dtype=np.float64)
        except OverflowError:
            return BadRequest(422, f"inputs hold integers too large for {dtype}")
        except (TypeError, ValueError):
            return BadRequest(422, "inputs must be numbers (found JSON objects among them)")
    if arr.dtype.kind not in "iuf":
        return BadRequest(
            422, f"inputs must be numbers (got JSON values of numpy kind {arr.dtype})"
        )
    if list(arr.shape[1:]) != want:
        return BadRequest(422, f"each sample must have shape {want}, got {list(arr.shape[1:])}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return BadRequest(422, "inputs contain numbers too large to be finite (read as infinity)")
    if dtype.kind == "f" and arr.size:
        limit = float(np.finfo(dtype).max)
        if float(np.abs(arr).max()) > limit:
            return BadRequest(422, f"inputs exceed the model's {dtype} range (+-{limit:.3g})")
    return None
