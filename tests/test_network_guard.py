"""No test reaches the network: not the test process, nor dvc, torchrun or the stage scripts it starts.

Two layers: the Python guard (every process that imports ``sitecustomize``) and, under
``make test``, a network namespace with only loopback (``tests/offline/isolated``) that also
holds for ``python -I``, a cleaned environment and non-Python children.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_kaggle_tree
from network_guard import NetworkAccessError
from test_pipeline import _env, make_project

REACH_OUT = "import socket; socket.create_connection(('example.com', 443), timeout=5)"
ISOLATED = Path(__file__).resolve().parent / "offline" / "isolated"
# A documentation address (RFC 5737), reached through the C socket module, which no guard patches.
RAW_CONNECT = "import _socket; s = _socket.socket(); s.settimeout(3); s.connect(('192.0.2.1', 80))"


def test_this_process_cannot_connect_beyond_loopback_and_its_attempts_are_logged(own_network_log):
    with socket.socket() as sock, pytest.raises(NetworkAccessError):
        sock.connect(("192.0.2.1", 80))
    with pytest.raises(NetworkAccessError):
        socket.getaddrinfo("www.kaggle.com", 443)

    assert [line.split(" (pid")[0] for line in own_network_log.read_text().splitlines()] == [
        "test tried to reach the network: connect ('192.0.2.1', 80)",
        "test tried to reach the network: resolve 'www.kaggle.com'",
    ]


@pytest.mark.parametrize("call", [
    lambda: socket.gethostbyname("www.kaggle.com"),
    lambda: socket.gethostbyname_ex("www.kaggle.com"),
    lambda: socket.gethostbyaddr("192.0.2.1"),
    lambda: socket.getnameinfo(("192.0.2.1", 80), 0),
], ids=["gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"])
def test_every_name_lookup_is_refused(own_network_log, call):
    with pytest.raises(NetworkAccessError):
        call()
    assert len(own_network_log.read_text().splitlines()) == 1


def test_local_name_lookups_stay_allowed():
    assert socket.gethostbyname("localhost") == "127.0.0.1"


def test_loopback_stays_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_a_python_subprocess_is_guarded_and_its_attempt_is_logged(own_network_log):
    done = subprocess.run([sys.executable, "-c", REACH_OUT], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode != 0
    assert "NetworkAccessError" in done.stderr
    assert "resolve 'example.com'" in own_network_log.read_text()


def test_torchrun_workers_are_guarded(own_network_log, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(REACH_OUT + "\n")
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node=1", str(script)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)
    assert done.returncode != 0
    assert "resolve 'example.com'" in own_network_log.read_text()
    assert str(script) in own_network_log.read_text()


@pytest.mark.slow
def test_a_stage_script_started_by_dvc_is_guarded_even_when_it_catches_the_error(own_network_log, tmp_path):
    source = make_kaggle_tree(tmp_path / "images", per_class=2).parent
    project = make_project(tmp_path, source, image_size=32, epochs=1)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["source"] = "https://example.com/chest-xray.zip"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(["dvc", "repro", "download"], cwd=project, env=_env(), capture_output=True, text=True)
    assert done.returncode != 0
    attempts = own_network_log.read_text()
    assert "example.com" in attempts and "stages/download.py" in attempts


def _namespaces_allowed() -> bool:
    probe = subprocess.run([str(ISOLATED), "true"], capture_output=True, text=True)
    return probe.returncode == 0 and "no network namespace" not in probe.stderr


@pytest.mark.skipif(not _namespaces_allowed(), reason="no network namespaces here: the Python guard alone applies")
@pytest.mark.parametrize("command", [
    [sys.executable, "-I", "-c", RAW_CONNECT],
    ["env", "-i", sys.executable, "-c", RAW_CONNECT],
    ["bash", "-c", "exec 3<>/dev/tcp/192.0.2.1/80"],
], ids=["python -I", "cleaned environment", "non-Python child"])
def test_the_namespace_cuts_what_the_python_guard_cannot_see(command):
    done = subprocess.run([str(ISOLATED), *command], capture_output=True, text=True, timeout=30)

    assert done.returncode != 0
    assert "Network is unreachable" in done.stderr


@pytest.mark.skipif(not _namespaces_allowed(), reason="no network namespaces here: the Python guard alone applies")
def test_the_namespace_keeps_loopback():
    serve_and_connect = ("import socket; s = socket.create_server(('127.0.0.1', 0)); "
                         "socket.create_connection(s.getsockname(), timeout=5); print('ok')")
    done = subprocess.run([str(ISOLATED), sys.executable, "-c", serve_and_connect], capture_output=True, text=True)

    assert (done.returncode, done.stdout) == (0, "ok\n")
