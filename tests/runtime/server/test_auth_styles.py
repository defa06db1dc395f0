"""The server's credentials (`--api-auth`, the token, their 401 challenges), settings that keep
secrets out of logs, and A1111's styles.csv: unit tests, no server process."""

from __future__ import annotations

import pytest

for _module in ("fastapi", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is missing (pip install 'sdrt[serve]' httpx)")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from sdrt.runtime.errors import InputError  # noqa: E402
from sdrt.runtime.server.middleware import AuthGate  # noqa: E402
from sdrt.runtime.server.settings import ServerSettings, parse_api_auth  # noqa: E402
from sdrt.runtime.server.styles import PromptStyle, apply_styles, read_styles  # noqa: E402

TOKEN = "kiosk-token-0123456789"
PAIRS = (("alice", "wonder-land-7"), ("bob", "builder-9"))


def gated(token: str | None, credentials=()) -> TestClient:
    app = Starlette(routes=[Route("/x", lambda _: PlainTextResponse("ok")),
                            Route("/health", lambda _: PlainTextResponse("up"))])
    return TestClient(AuthGate(app, token=token, credentials=credentials))


def test_api_auth_pairs_and_token_each_open_the_gate():
    client = gated(TOKEN, PAIRS)
    refused = client.get("/x")
    assert refused.status_code == 401
    assert refused.headers.get_list("www-authenticate") == ["Bearer", 'Basic realm="sdrt"']
    assert client.get("/x", auth=("alice", "wonder-land-7")).status_code == 200
    assert client.get("/x", auth=("bob", "builder-9")).status_code == 200
    assert client.get("/x", auth=("anyone", TOKEN)).status_code == 200  # token as password
    assert client.get("/x", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    for user, password in (("alice", "builder-9"), ("carol", "wonder-land-7"), ("alice", "")):
        assert client.get("/x", auth=(user, password)).status_code == 401
    assert client.get("/x", headers={"Authorization": "Basic !!"}).status_code == 401
    assert client.get("/health").status_code == 200  # public


def test_api_auth_alone_offers_basic_only():
    client = gated(None, PAIRS)
    refused = client.get("/x", headers={"Authorization": "Bearer wonder-land-7"})
    assert refused.status_code == 401
    assert refused.headers.get_list("www-authenticate") == ['Basic realm="sdrt"']
    assert "Bearer" not in refused.json()["detail"]
    assert client.get("/x", auth=("alice", "wonder-land-7")).status_code == 200


def test_parse_api_auth_and_its_errors_never_echo_a_password():
    assert parse_api_auth("alice:wonder-land-7, bob:a:b") == (("alice", "wonder-land-7"),
                                                             ("bob", "a:b"))
    assert parse_api_auth(None) == ()
    for bad in ("alice", "alice:", ":secret-value", "alice:ok,secret-value"):
        with pytest.raises(InputError) as caught:
            parse_api_auth(bad)
        assert "secret" not in str(caught.value) and "user:password" in str(caught.value)


def test_public_bind_takes_credentials_and_settings_hide_secrets():
    with pytest.raises(InputError, match="--api-auth"):
        ServerSettings(host="0.0.0.0").validate()
    settings = ServerSettings(host="0.0.0.0", api_auth=PAIRS, token=TOKEN)
    settings.validate()
    assert "wonder" not in repr(settings) and TOKEN not in repr(settings)
    ServerSettings(max_queue=0).validate()  # no waiting list: only the running jobs
    with pytest.raises(InputError, match="max-queue"):
        ServerSettings(max_queue=-1).validate()


def test_styles_apply_as_a1111():
    styles = (PromptStyle("frame", "{prompt}, framed", "{prompt}, cropped"),
              PromptStyle("blue", "on blue", ""), PromptStyle("neg", "", "blurry"))
    assert apply_styles("a cat", "dark", ["frame"], styles) == ("a cat, framed", "dark, cropped")
    assert apply_styles("a cat", "", ["blue", "neg"], styles) == ("a cat, on blue", "blurry")
    assert apply_styles("", "", ["blue"], styles) == ("on blue", "")  # nothing to join
    assert apply_styles("a cat", "", [], ()) == ("a cat", "")
    with pytest.raises(InputError, match="unknown style.*'red'.*frame, blue, neg"):
        apply_styles("a cat", "", ["blue", "red"], styles)


def test_read_styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('\ufeffname,prompt,negative_prompt,extra\n"a, b","x, {prompt}",n,1\n'
                    ',ignored,\nsecond,y,\n', "utf-8")
    assert read_styles(path) == (PromptStyle("a, b", "x, {prompt}", "n"),
                                 PromptStyle("second", "y", ""))
    path.write_text("title,prompt\nx,y\n")
    with pytest.raises(InputError, match="header must name"):
        read_styles(path)
    path.write_text("name,prompt\nx,y\nx,z\n")
    with pytest.raises(InputError, match="repeat: x"):
        read_styles(path)
    with pytest.raises(InputError, match="no such file"):
        read_styles(tmp_path / "missing.csv")
