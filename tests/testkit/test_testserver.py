"""``pop3d testserver``: its JSON HTTP API through curl, and its web page in Chromium."""

from __future__ import annotations

import json
import os
import poplib
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.timeout(90), pytest.mark.client]


@dataclass
class TestServer:
    __test__ = False
    process: subprocess.Popen[str]
    info: dict[str, Any]

    @property
    def url(self) -> str:
        return str(self.info["url"])

    def api(self, method: str, path: str, data: str | None = None,
            content_type: str = "application/json") -> tuple[int, Any]:
        """One request with curl; return the status and the decoded JSON."""
        args = ["curl", "-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}"]
        if data is not None:
            args += ["-H", f"Content-Type: {content_type}", "--data-binary", data]
        done = subprocess.run([*args, self.url + path.lstrip("/")],
                              capture_output=True, text=True, timeout=20, check=True)
        body, _, status = done.stdout.rpartition("\n")
        return int(status), json.loads(body) if body else None

    def pop3(self, user: str = "alice", password: str = "secret") -> poplib.POP3:
        client = poplib.POP3(self.info["host"], self.info["pop3"], timeout=10)
        try:
            client.user(user)
            client.pass_(password)
        except BaseException:
            client.close()
            raise
        return client


@pytest.fixture
def testserver(tmp_path: Path) -> Iterator[TestServer]:
    process = subprocess.Popen(
        [sys.executable, "-m", "pop3d", "testserver", "--user", "alice:secret", "--user", "bob",
         "--root", str(tmp_path / "root")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(process.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "pop3d testserver printed nothing"
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        yield TestServer(process, json.loads(line))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)
        if process.stdout:
            process.stdout.close()
        err = process.stderr.read() if process.stderr else ""
        if process.stderr:
            process.stderr.close()
        assert status == 0, err
        assert "Traceback" not in err, err


def test_api_through_curl(testserver: TestServer, tmp_path: Path) -> None:
    info = testserver.info
    assert info["users"]["alice"] == "secret"
    assert len(info["users"]["bob"]) >= 12
    assert Path(info["ca_cert"]).is_file()
    assert info["pop3s"]
    assert testserver.api("GET", "/api/server") == (200, info)

    raw = tmp_path / "raw.eml"
    raw.write_bytes(b"From: a@example.org\r\nSubject: raw one\r\n\r\nraw body\r\n")
    status, made = testserver.api("POST", "/api/mailboxes/alice/messages", f"@{raw}",
                                  "message/rfc822")
    assert (status, made["subject"], made["index"]) == (201, "raw one", 0)
    status, made = testserver.api("POST", "/api/mailboxes/alice/messages",
                                  json.dumps({"subject": "json two", "body": "second"}))
    assert (status, made["index"]) == (201, 1)
    status, listed = testserver.api("GET", "/api/mailboxes/alice/messages")
    assert [m["subject"] for m in listed] == ["raw one", "json two"]
    status, one = testserver.api("GET", "/api/mailboxes/alice/messages/0")
    assert status == 200
    assert "raw body" in one["raw"]
    assert ["Subject", "raw one"] in one["headers"]

    client = testserver.pop3()
    assert client.retr(1)[1][-1] == b"raw body"
    client.quit()

    status, fault = testserver.api("POST", "/api/faults",
                                   json.dumps({"kind": "login", "code": "AUTH", "user": "alice"}))
    assert status == 201
    assert fault["id"] == 1
    with pytest.raises(poplib.error_proto) as refused:
        testserver.pop3()
    assert b"[AUTH]" in refused.value.args[0]
    assert testserver.api("GET", "/api/faults")[1] == [fault]
    assert testserver.api("DELETE", "/api/faults/1") == (200, {"removed": 1})
    testserver.pop3().quit()

    status, error = testserver.api("POST", "/api/faults", json.dumps({"kind": "nope"}))
    assert status == 400
    assert "kind must be one of" in error["error"]
    status, error = testserver.api("POST", "/api/faults",
                                   json.dumps({"kind": "latency", "seconds": "soon"}))
    assert status == 400
    assert "seconds" in error["error"]

    status, sessions = testserver.api("GET", "/api/transcripts")
    assert status == 200
    assert len(sessions) == 3
    status, first = testserver.api("GET", f"/api/transcripts/{sessions[0]['id']}")
    texts = [f"{line['who']}: {line['text']}" for line in first["lines"]]
    assert "C: PASS ****" in texts
    assert "S: raw body" in texts
    assert not any("secret" in t for t in texts)

    assert testserver.api("DELETE", "/api/mailboxes/alice/messages/0")[1] == {"deleted": 1}
    assert testserver.api("DELETE", "/api/mailboxes/alice/messages/5")[0] == 404
    assert testserver.api("GET", "/api/mailboxes/nobody/messages")[0] == 404
    assert testserver.api("GET", "/api/nothing")[0] == 404
    assert testserver.api("POST", "/api/reset") == (200, {"reset": True})
    assert testserver.api("GET", "/api/mailboxes/alice/messages") == (200, [])
    assert testserver.api("GET", "/api/transcripts") == (200, [])


def test_openapi_document_matches_the_routes(testserver: TestServer) -> None:
    status, doc = testserver.api("GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    kinds = doc["paths"]["/api/faults"]["post"]["requestBody"]["content"]["application/json"]
    assert "certificate" in kinds["schema"]["properties"]["kind"]["enum"]
    for path, operations in doc["paths"].items():
        if "get" in operations and "{" not in path:
            assert testserver.api("GET", path)[0] == 200, path
    status, catalogue = testserver.api("GET", "/api/faults/catalogue")
    assert {k["kind"] for k in catalogue} == set(kinds["schema"]["properties"]["kind"]["enum"])


def test_web_page_in_chromium(testserver: TestServer) -> None:
    from playwright.sync_api import expect, sync_playwright  # noqa: PLC0415

    testserver.api("POST", "/api/mailboxes/alice/messages",
                   json.dumps({"subject": "seen in a browser", "body": "hello page"}))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(testserver.url)
            page.click("li[data-user=alice]")
            page.click("#messages li[data-index='0']")
            expect(page.locator("#message")).to_contain_text("hello page")
            expect(page.locator("#messages")).to_contain_text("seen in a browser")
            # A session made now shows up live, with its transcript.
            client = testserver.pop3()
            client.stat()
            session = page.locator("#sessions li").first
            expect(session).to_contain_text("alice")
            session.click()
            expect(page.locator("#transcript")).to_contain_text("C: PASS ****")
            expect(page.locator("#transcript")).to_contain_text("C: STAT")
            client.quit()
            expect(page.locator("#transcript")).to_contain_text("C: QUIT")
            # A fault set through the API is listed.
            testserver.api("POST", "/api/faults", json.dumps({"kind": "uidl_change"}))
            expect(page.locator("#faults")).to_contain_text("uidl_change")
        finally:
            browser.close()


def test_fixed_ports_and_no_tls(tmp_path: Path) -> None:
    from pop3d.testing import free_port  # noqa: PLC0415

    pop3, http = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pop3d", "testserver", "--no-tls", "--pop3-port", str(pop3),
         "--http-port", str(http), "--user", "zoe:pw"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert (info["pop3"], info["http"], info["pop3s"], info["ca_cert"]) == (
            pop3, http, None, None)
        client = poplib.POP3("127.0.0.1", pop3, timeout=10)
        assert "STLS" not in client.capa()
        client.quit()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        if process.stdout:
            process.stdout.close()
