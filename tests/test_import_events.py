"""``recsvc import-events`` against a running ``recsvc serve``: past interactions land in
users' histories in file order, bad rows are named by line and skipped, and a rerun
continues after what was confirmed."""

from __future__ import annotations

import pytest

from app.tools.cli import main
from app.tools.client import Client
from app.tools.processes import running_service_process


@pytest.fixture(scope="module")
def service():
    with running_service_process() as (url, _), Client(url) as client:
        client.upsert([{"item_id": f"m-{i}", "text": f"movie {i}"} for i in range(5)])
        yield url, client


def test_import_events_fills_histories_in_order_and_skips_bad_rows(service, tmp_path, capsys):
    url, client = service
    path = tmp_path / "past.csv"
    path.write_text("user_id,item_id,event,value\n"
                    "u-1,m-0,click,\n"
                    "u-2,m-1,purchase,\n"
                    "u-1,m-3,rating,4.5\n"
                    "u-1,m-9,click,\n"        # not in the catalog: 404 from the service
                    "u-2,m-2,teleport,\n"     # not an event type: refused before sending
                    "u-1,m-4,rating,lots\n"   # not a number
                    "u-1,m-2,like,\n")
    with pytest.raises(SystemExit) as stop:
        main(["import-events", str(path), "--url", url])
    assert stop.value.code == 1  # some rows were skipped
    out = capsys.readouterr()
    assert "imported 4 events" in out.out
    for line in (5, 6, 7):
        assert f"{path}:{line}: skipped:" in out.err
    assert "Traceback" not in out.err and "3 rows of" in out.err
    history = [(h["item_id"], h["event"]) for h in client.user("u-1")["history"]]
    assert history == [("m-0", "click"), ("m-3", "rating"), ("m-2", "like")]
    assert [h["item_id"] for h in client.user("u-2")["history"]] == ["m-1"]

    # a rerun continues after the confirmed rows: nothing is sent twice
    main(["import-events", str(path), "--url", url])
    assert "imported 0 events" in capsys.readouterr().out
    assert len(client.user("u-1")["history"]) == 3


def test_import_events_says_what_is_wrong_with_the_file(service, tmp_path, capsys):
    url, _ = service
    for name, text, expected in (("missing.jsonl", None, "no such file"),
                                 ("cols.csv", "user,item\nu,m-1\n", "no user_id or item_id "
                                  "or event column"),
                                 ("bad.jsonl", '{"user_id": "u-3", "item_id": "m-1", '
                                  '"event": "click"}\n[1, 2]\n', ":2: not a JSON object")):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(SystemExit) as stop:
            main(["import-events", str(path), "--url", url])
        assert stop.value.code == 1
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def test_import_events_cut_short_resends_nothing_it_had_sent(service, tmp_path, monkeypatch,
                                                             capsys):
    """A run that fails part-way (the service goes away) remembers every row the service
    answered; the rerun sends only the rest, and a changed file is refused, not guessed."""
    import app.tools.client

    url, client = service
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(f'{{"user_id": "cut-{n % 3}", "item_id": "m-{n % 5}", '
                            f'"event": "click"}}\n' for n in range(12)))
    real = app.tools.client.AsyncClient.event
    calls = 0

    async def failing(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise ConnectionError("the service went away")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(app.tools.client.AsyncClient, "event", failing)
    with pytest.raises(SystemExit) as stop:
        main(["import-events", str(path), "--url", url])
    assert stop.value.code == 1 and "cannot reach the service" in capsys.readouterr().err
    monkeypatch.setattr(app.tools.client.AsyncClient, "event", real)
    main(["import-events", str(path), "--url", url])
    assert "imported 7 events" in capsys.readouterr().out
    total = sum(len(client.user(f"cut-{u}")["history"]) for u in range(3))
    assert total == 12  # each row once

    with path.open("a") as fh:  # rows appended: where to continue is the user's call
        fh.write('{"user_id": "cut-0", "item_id": "m-1", "event": "click"}\n')
    with pytest.raises(SystemExit):
        main(["import-events", str(path), "--url", url])
    assert "--from-start" in capsys.readouterr().err
