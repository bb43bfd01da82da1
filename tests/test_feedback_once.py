"""An accepted feedback event is stored exactly once, whatever fails between the
client and Redis: a retry after a failed write is accepted and stored, a retry after
writes whose reply was lost is a duplicate, and redone writes add nothing twice.

At 3b796b0 the first case answered the retry ``duplicate`` with nothing stored (the
marker's release failed too), and the second stored the event twice (two stream and
history entries, a doubled reward in the evaluation log)."""

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import redis

from app.store import Impression, StoreUnavailable
from app.store.base import FeedbackEvent
from app.store.redis_impressions import _RECORD_ONCE
from app.store.redis_store import RedisStore
from tests.conftest import free_port, wait_port


@pytest.fixture
async def paused_store():
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, timeout=10)
    s = RedisStore(f"redis://127.0.0.1:{port}/0", "once", timeout_s=0.5)
    await s.impressions.log_impression(Impression("r", "u", time.time(), 1,
                                                  np.ones(4, np.float32).tobytes(), ["a", "b"],
                                                  [0.9, 0.5], [False, False]), 60, 10)
    # the feedback script loaded up front, so that a test pausing Redis before the
    # writes pauses it before they run, not before the script's load
    await s.r.script_load(_RECORD_ONCE.text)
    s.scripts_loaded.add(_RECORD_ONCE.sha)
    yield s, proc
    os.kill(proc.pid, signal.SIGCONT)
    await s.close()
    proc.terminate()
    proc.wait(10)


async def _stored(s: RedisStore) -> tuple[int, int, float]:
    """Feedback stream entries, history entries, and the impression's reward for "a"."""
    entries = await s.r.xrange(s._stream)
    feedback = sum(1 for _, f in entries if f[b"type"] == b"feedback")
    history = (await s.users.get_user("u")).history
    reward = (await s.impressions.get_impressions(["r"]))["r"].rewards.get("a", 0.0)
    return feedback, len(history), reward


async def test_a_retry_after_writes_that_never_landed_is_accepted_and_stored(paused_store):
    """Redis died after the dedupe marker was set, before the writes (and before any
    release of the marker could reach it)."""
    s, _ = paused_store
    write = s.impressions._write_feedback

    async def redis_died(*args):
        raise StoreUnavailable("connection lost")

    s.impressions._write_feedback = redis_died
    with pytest.raises(StoreUnavailable):
        await s.impressions.record_feedback("r", "u", "a", "click", None, 1.0, 5.0, 60, 10)
    s.impressions._write_feedback = write
    accepted, reward = await s.impressions.record_feedback("r", "u", "a", "click", None, 1.0, 6.0,
                                                           60, 10)
    assert accepted and reward == 1.0
    assert await _stored(s) == (1, 1, 1.0)
    again, _ = await s.impressions.record_feedback("r", "u", "a", "click", None, 1.0, 7.0, 60, 10)
    assert not again and await _stored(s) == (1, 1, 1.0)


async def test_a_redis_paused_mid_write_stores_the_event_once(paused_store):
    """Redis stops answering with the writes on the wire: the call fails at its
    deadline; whatever of the writes Redis carries out once it resumes, the client's
    retry is answered with a 2xx and the event is stored once."""
    s, proc = paused_store
    write = s.impressions._write_feedback

    async def pause_then_write(*args):
        os.kill(proc.pid, signal.SIGSTOP)
        await write(*args)

    s.impressions._write_feedback = pause_then_write
    with pytest.raises(StoreUnavailable):
        await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, 5.0, 60, 10)
    os.kill(proc.pid, signal.SIGCONT)
    s.impressions._write_feedback = write
    out = await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, 6.0, 60, 10)
    assert out.status in ("accepted", "duplicate") and out.reward == 1.0
    assert await _stored(s) == (1, 1, 1.0)


async def test_a_retry_after_writes_whose_reply_was_lost_is_a_duplicate(paused_store):
    """The feedback's writes land, but their reply misses the call's deadline."""
    s, _ = paused_store
    make_pipeline = s.r.pipeline
    lost = []

    def pipeline(*args, **kwargs):
        pipe = make_pipeline(*args, **kwargs)
        execute = pipe.execute

        async def landed_then_timed_out(*a, **k):
            writes = any(c[0][0] in ("XADD", "EVALSHA") for c in pipe.command_stack)
            replies = await execute(*a, **k)
            if not lost and writes:
                lost.append(True)  # the writes of the feedback: their reply is lost
                raise redis.exceptions.TimeoutError("the reply missed the deadline")
            return replies

        pipe.execute = landed_then_timed_out
        return pipe

    s.r.pipeline = pipeline
    with pytest.raises(StoreUnavailable):
        await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, 5.0, 60, 10)
    del s.r.pipeline
    assert lost
    out = await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, 6.0, 60, 10)
    assert out.status == "duplicate" and out.reward == 1.0
    assert await _stored(s) == (1, 1, 1.0)


async def test_redone_writes_add_nothing_twice(paused_store):
    """The writes landed but not the marker's last step (the connection dropped between
    the commands of one pipeline): the retry redoes them, and the history and the
    impression's reward hold the event once (the stream entry it repeats is skipped
    by the learner, which learns a feedback key once)."""
    s, _ = paused_store
    marker = s.impressions._marker("r", "a", "click")
    await s.r.set(marker, b"pending", ex=60)
    await s.impressions._write_feedback(
        [(FeedbackEvent("r", "a", "click", None, 1.0, 5.0), "u", marker, 0.0)], 10, 60)
    await s.r.set(marker, b"pending", ex=60)  # as if the marker's step had not landed
    out = await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, 6.0, 60, 10)
    assert out.status == "accepted"
    feedback, history, reward = await _stored(s)
    assert history == 1 and reward == 1.0
    again = await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, 7.0, 60, 10)
    assert again.status == "duplicate"


async def test_a_write_refused_by_redis_leaves_the_event_open_to_its_retry(paused_store):
    """One of the writes gets an error reply (here the stream key holds a string:
    WRONGTYPE). The marker must not stay moved to the reward: the retry is accepted and
    stored. Before, the pipeline carried on past the error and moved the marker, and
    the retry was answered ``duplicate`` with no stream entry."""
    import redis.exceptions as rexc

    s, _ = paused_store
    await s.r.delete(s._stream)
    await s.r.set(s._stream, b"not a stream")
    with pytest.raises(rexc.ResponseError):
        await s.impressions.record_feedback("r", "u", "a", "click", None, 1.0, 5.0, 60, 10)
    await s.r.delete(s._stream)
    s.group_ready = False
    accepted, reward = await s.impressions.record_feedback("r", "u", "a", "click", None, 1.0, 6.0,
                                                           60, 10)
    assert accepted and reward == 1.0
    assert await _stored(s) == (1, 1, 1.0)


async def test_feedback_is_stored_after_redis_lost_its_scripts(paused_store):
    """Feedback's writes run as a script by its SHA1; a server that lost its scripts
    (restarted, or SCRIPT FLUSH) answers NOSCRIPT, and the script is loaded again:
    the event is accepted and stored once."""
    s, _ = paused_store
    first = await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, 5.0, 60, 10)
    assert first.status == "accepted"
    await s.r.script_flush()
    out = await s.impressions.feedback_on_slate("r", "b", "click", None, 1.0, 6.0, 60, 10)
    assert out.status == "accepted" and out.reward == 1.0
    history = (await s.users.get_user("u")).history
    assert [h["item_id"] for h in history] == ["a", "b"]
    entries = await s.r.xrange(s._stream)
    assert [f[b"item_id"] for _, f in entries if f[b"type"] == b"feedback"] == [b"a", b"b"]
