"""Request handling of `nasforge serve` over the space of bodies: the structure scan against a
reference lexer, the status counter, and a Hypothesis fuzz of a real server (no 5xx, ever)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from nasforge.serve.metrics import StatusCounts
from nasforge.serve.middleware import StatusCounter
from nasforge.serve.validation import RequestRules, check_body, json_structure
from tests.test_serve import SHAPE, Server, _candidate, _post_raw, _request, settled_metrics

RULES = RequestRules(SHAPE, max_items=8)
MAX_ITEMS = 8
# Numbers a CIFAR-style model input may hold (normalised pixels are a few units) and far beyond.
FINITE = st.floats(-1e6, 1e6, allow_nan=False, width=32) | st.integers(-(10**6), 10**6)

json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)


def _reference_structure(body: bytes) -> tuple[int, bool]:
    """Byte-by-byte lexer: nesting depth and true/false/null outside strings, up to the first
    backslash outside a string (where a JSON parser stops with a syntax error)."""
    depth = deepest = 0
    literal = in_string = escaped = False
    for c in body.decode("latin-1"):
        if not in_string and c == "\\":
            break
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
        elif c in "tfn":
            literal = True
    return deepest, literal


@settings(max_examples=400, database=None)
@given(json_values)
def test_structure_scan_matches_a_reference_lexer_on_json(value):
    body = json.dumps(value).encode()
    # Padding with whitespace changes nothing but moves a body dense with brackets, quotes and
    # letters (scanned as whole arrays) to the sparse path (scanned at the marked bytes).
    padded = body + b" " * (8 * len(body))
    assert json_structure(body) == json_structure(padded) == _reference_structure(body)


@settings(max_examples=300, database=None)
@given(st.text(alphabet='[]{}"\\tfn0 ,:ab', max_size=60))
def test_structure_scan_bounds_the_parser_depth_on_any_text(text):
    # Outside valid JSON what matters is that a parser never nests deeper than the scan says
    # before it stops at an error; deeper counts after that point only refuse a bad body.
    body = text.encode()
    depth = _reference_structure(body)[0]
    assert json_structure(body)[0] >= depth
    assert json_structure(body + b" " * (8 * len(body)))[0] >= depth


@st.composite
def valid_inputs(draw, max_items: int = MAX_ITEMS) -> bytes:
    """A valid request body: seeded random samples at a drawn scale, written as JSON floats or
    integers, with a few Hypothesis-chosen numbers at Hypothesis-chosen places."""
    n = draw(st.integers(1, max_items))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, *SHAPE)) * draw(st.sampled_from([1e-30, 1e-3, 1.0, 3.0, 1e6]))
    for v in draw(st.lists(FINITE, max_size=5)):
        x.flat[draw(st.integers(0, x.size - 1))] = v
    inputs = np.round(x).astype(np.int64).tolist() if draw(st.booleans()) else x.tolist()
    return json.dumps({"inputs": inputs}).encode()


@settings(max_examples=300, database=None)
@given(valid_inputs())
def test_valid_bodies_pass_the_checks(body):
    assert check_body(body, RULES) is None


@settings(max_examples=400, database=None)
@given(json_values | st.fixed_dictionaries({"inputs": json_values}) | st.binary(max_size=64))
def test_random_bodies_get_a_4xx_from_the_checks(value):
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    bad = check_body(body, RULES)  # none of these has 8 x 3 x 8 x 8 numbers
    assert bad is not None and 400 <= bad.status < 500 and bad.message


def test_status_counter_counts_framework_and_unhandled_errors():
    def boom(request):
        raise RuntimeError("a bug")

    app = Starlette(routes=[Route("/ok", lambda r: PlainTextResponse("ok")), Route("/boom", boom)])
    counts = StatusCounts()
    app.add_middleware(StatusCounter, counts=counts)

    async def statuses() -> list[int]:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            calls = [("GET", "/ok"), ("GET", "/boom"), ("GET", "/missing"), ("POST", "/ok")]
            return [(await client.request(m, p)).status_code for m, p in calls]

    assert asyncio.run(statuses()) == [200, 500, 404, 405]
    assert counts.snapshot() == {"404": 1, "405": 1, "500": 1}


# --- the fuzz of a real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-fuzz")
    _candidate(root, "net", 8, 0.5)
    srv = Server(
        root,
        max_batch_size=4,
        max_queue_delay_ms=1,
        slo_ms=500,
        switching=False,
        max_body_bytes=1_000_000,
        max_items_per_request=MAX_ITEMS,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _pad(body: bytes) -> bytes:
    """The same JSON with 300 KB of whitespace: large enough to be checked in a thread."""
    return body[:-1] + b" \n" * 150_000 + b"}"


@st.composite
def near_misses(draw) -> bytes:
    """A valid request with one thing wrong."""
    x = np.zeros((draw(st.integers(1, 3)), *SHAPE)).tolist()
    kind = draw(
        st.sampled_from(["leaf", "shape", "ragged", "deep", "key", "count", "huge", "large"])
    )
    if kind == "leaf":
        leaf = draw(
            st.sampled_from([True, False, None, "1", [], {}, float("nan"), float("inf"), 1e39])
        )
        x[0][draw(st.integers(0, 2))][draw(st.integers(0, 7))][draw(st.integers(0, 7))] = leaf
        return json.dumps({"inputs": x}).encode()
    if kind == "shape":
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=4))
        if shape == list(SHAPE):
            shape = [*SHAPE, 1]
        return json.dumps({"inputs": [np.zeros(shape).tolist()]}).encode()
    if kind == "ragged":
        del x[0][1][draw(st.integers(0, 7))]
        return json.dumps({"inputs": x}).encode()
    if kind == "deep":
        n = draw(st.sampled_from([6, 65, 1_000, 5_000, 100_000]))
        return b'{"inputs": ' + b"[" * n + b"1" + b"]" * n + b"}"
    if kind == "key":
        key = draw(st.text(min_size=1, max_size=5).filter(lambda k: k != "inputs"))
        return json.dumps({"inputs": x, key: 1}).encode()
    if kind == "count":
        return json.dumps({"inputs": np.zeros((MAX_ITEMS + 1, *SHAPE)).tolist()}).encode()
    if kind == "large":  # under max_body_bytes, checked off the event loop
        x[0][0][0][0] = True
        return _pad(json.dumps({"inputs": x}).encode())
    return b'{"inputs": [' + b"0," * 600_000 + b"0]}"  # over max_body_bytes


content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/json; charset=utf-8",
        "multipart/form-data; boundary=xyz",
        "application/json; charset=latin-1",
    ]
)
REFUSED_TYPES = {"multipart/form-data; boundary=xyz", "application/json; charset=latin-1"}

# (kind, body) with the kind telling the expected answer, and the Content-Type to send.
bodies = {
    "valid": st.tuples(valid_inputs(max_items=3), st.integers(0, 7)).map(
        lambda t: _pad(t[0]) if t[1] == 0 else t[0]
    ),
    "near": near_misses(),
    "json": (json_values | st.fixed_dictionaries({"inputs": json_values})).map(
        lambda v: json.dumps(v).encode()
    ),
    "bytes": st.binary(max_size=200),
}
requests = st.tuples(
    st.sampled_from(sorted(bodies)).flatmap(lambda k: st.tuples(st.just(k), bodies[k])),
    content_types,
)
DEEP = b'{"inputs": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}"
MIXED = json.dumps({"inputs": [[[[0.5, True] * 4] * 8] * 3]}).encode()


def test_fuzz_server_answers_2xx_or_4xx_and_keeps_serving(fuzz_server):
    url = fuzz_server.url
    _, before = _request(url + "/metrics")
    seen: dict[int, int] = {}

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests)
    @example((("near", DEEP), None))
    @example((("near", MIXED), "application/json"))
    @example((("near", b'{"inputs": [[[[NaN]]]]}'), None))
    @example((("valid", json.dumps({"inputs": np.ones((1, *SHAPE)).tolist()}).encode()), None))
    def one(case):
        (kind, body), ctype = case
        status, doc = _post_raw(url, body, {"Content-Type": ctype} if ctype else {})
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (kind, ctype, body[:200], doc)
        if ctype in REFUSED_TYPES:
            assert status == 415, (ctype, doc)
        elif kind == "valid":
            n = len(json.loads(body)["inputs"])
            assert status == 200, (body[:200], doc)
            assert np.array(doc["outputs"]).shape == (n, 4) and len(doc["classes"]) == n
            assert np.isfinite(doc["outputs"]).all()
        else:  # every other generated body is malformed
            assert 400 <= status < 500 and doc.get("error"), (kind, body[:200], doc)

    one()
    print(f"fuzz statuses: {dict(sorted(seen.items()))}")
    # Not vacuous: valid requests were served and malformed ones refused for several reasons.
    assert sum(seen.values()) >= 300 and seen.get(200, 0) > 0
    assert {400, 415, 422} <= set(seen)
    # Still serving, and every non-2xx it sent is in /metrics (published by the HTTP process).
    good = json.dumps({"inputs": np.zeros((1, *SHAPE)).tolist()}).encode()
    assert _post_raw(url, good)[0] == 200
    served = before.get("requests", 0) + seen.get(200, 0) + 1
    after = settled_metrics(url, lambda m: m.get("requests", 0) >= served)
    non_2xx = {str(k): v for k, v in seen.items() if not 200 <= k < 300}
    delta = {k: v - before["rejected"].get(k, 0) for k, v in after["rejected"].items()}
    assert {k: v for k, v in delta.items() if v} == non_2xx
    assert after["requests"] == served
