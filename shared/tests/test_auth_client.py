"""Unit tests: hashed tokens and the SSE parser of the client."""

from __future__ import annotations

import json

import aiohttp
import pytest

from vigil import auth
from vigil.client import _parse_sse

pytestmark = pytest.mark.unit


def test_tokens_stored_as_digests_and_verified(tmp_path) -> None:
    path = tmp_path / "tokens.json"
    token = auth.add_token(path, "ci", "acme", "submitter")
    assert token.startswith("vgl_")
    stored = path.read_text()
    assert token not in stored and auth.digest(token) in stored
    assert (path.stat().st_mode & 0o777) == 0o600
    book = auth.TokenBook.load(path)
    who = book.verify(token)
    assert who is not None and who.tenant == "acme" and who.role == "submitter"
    assert book.verify(token + "x") is None
    assert who.can("viewer") and who.can("submitter") and not who.can("operator")


def test_bad_tokens_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "x", "tenant": "a", "role": "king",
                                            "sha256": "0" * 64}]}))
    with pytest.raises(auth.SettingsError, match="role"):
        auth.TokenBook.load(path)


async def test_sse_parser() -> None:
    reader = aiohttp.StreamReader(_Protocol(), 2**16)
    reader.feed_data(b": comment\n\nid: 5\nevent: log\ndata: {\"lines\": [\"a\"]}\n\n"
                     b"id: 6\nevent: finished\ndata: {\"status\": \"succeeded\"}\n\n")
    reader.feed_eof()
    events = [e async for e in _parse_sse(reader)]
    assert [(e.seq, e.kind) for e in events] == [(5, "log"), (6, "finished")]
    assert events[0].data == {"lines": ["a"]}


class _Protocol:
    _reading_paused = False

    def pause_reading(self, **_: object) -> None:
        pass

    def resume_reading(self, **_: object) -> None:
        pass
