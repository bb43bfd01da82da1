"""Unauthenticated clients cannot exhaust the HTTP layer: headers are bounded in size
and time, a body is refused before it is read when its sender has no key or its size
is over the limit, and a chunked body over the limit gets 413 like any other.

Against ``recsvc serve`` over a real socket (uvicorn's protocol is what bounds the
headers). At 3b796b0 a 1 MiB header got 200, an unfinished request was still served
after 40 s, a keyless 8 MB body got 401 only once read and parsed, and a chunked body
over the limit got 400.
"""

import socket
import time

import pytest

from app.tools.processes import running_service_process

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def service():
    env = {"RECSVC_API_KEYS": "k-1", "RECSVC_HEADER_TIMEOUT_S": "1",
           "RECSVC_BODY_TIMEOUT_S": "1",
           "RECSVC_MAX_HEADER_BYTES": "16384", "RECSVC_DEVICE": "cpu",
           "RECSVC_REPLAY_PREFAULT": "false"}
    with running_service_process(env) as (url, _):
        yield int(url.rsplit(":", 1)[1])


def _exchange(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_an_oversized_header_gets_431(service):
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (1 << 20) + b"\r\n\r\n"
    reply = _exchange(service, big)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:80]


def test_an_unfinished_request_is_closed_at_the_header_timeout(service):
    with socket.create_connection(("127.0.0.1", service), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        reply = s.recv(65536)
        assert time.monotonic() - started < 5
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]


def test_a_keyless_body_is_refused_before_it_is_sent(service):
    """Headers announce 8 MB and no key; the 401 comes back with no byte of the body
    sent."""
    head = (b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 8388608\r\n\r\n")
    reply = _exchange(service, head, wait_s=3)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:80]


def test_a_chunked_body_over_the_limit_gets_413(service):
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    req = (b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nX-API-Key: k-1\r\n"
           b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n") + body
    reply = _exchange(service, req)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:80]
    assert b"payload_too_large" in reply


def test_health_answers_while_bad_clients_wait(service):
    with socket.create_connection(("127.0.0.1", service)) as held:
        held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # unfinished, holding a connection
        reply = _exchange(service, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait_s=2)
        assert reply.startswith(b"HTTP/1.1 200")


def test_a_body_that_never_finishes_gets_408(service):
    """A key, headers complete, then the body trickles and stops: the connection slot is
    not held for ever (before, only the headers had a deadline)."""
    with socket.create_connection(("127.0.0.1", service), timeout=10) as s:
        s.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nX-API-Key: k-1\r\n"
                  b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"us")
        started = time.monotonic()
        reply = s.recv(65536)
        assert time.monotonic() - started < 5
        while chunk := s.recv(65536):  # the body may come in a packet of its own
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert b"request_timeout" in reply


def test_a_body_to_a_route_outside_the_api_is_not_read(service):
    """No route outside /v1 takes a body: a keyless POST announcing 1 MB to /healthz is
    answered (405) without waiting for the body."""
    head = (b"POST /healthz HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000000\r\n\r\n")
    reply = _exchange(service, head, wait_s=3)
    assert reply.startswith(b"HTTP/1.1 405"), reply[:80]
