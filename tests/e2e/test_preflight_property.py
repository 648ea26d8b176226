"""check-config refuses a config exactly when `run` would fail to start with it (issue 19, item 1).

The invariant, over combinations of the faults an operator meets (certificate files missing, of
another key, expired, not PEM; listen addresses that do not resolve or are not this host's; a data
directory under a file; a queue database that is not one; a backend client key missing): the checks
`check-config` makes (the schema, then :func:`proxy.ops.preflight.preflight`) find a problem if and
only if the start-up `run` makes (:func:`proxy.cli.start`, real sockets on 127.0.0.1) fails. Ports
are 0, so a port another process holds, which only binding can tell, is not among the faults.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cli import start
from proxy.config import Config, ConfigError, LineIndex, loads
from proxy.ops import certs
from proxy.ops.preflight import preflight
from proxy.storage.interface import StorageError

TLS = {
    "off": 'tls = "off"',
    "good": 'tls = "on"\ncert = "tls/good.crt"\nkey = "tls/good.key"',
    "missing": 'tls = "on"\ncert = "tls/none.crt"\nkey = "tls/none.key"',
    "other key": 'tls = "on"\ncert = "tls/good.crt"\nkey = "tls/other.key"',
    "expired": 'tls = "detect"\ncert = "tls/old.crt"\nkey = "tls/old.key"',
    "self-signed": 'tls = "detect"\ncerts_dir = "made"',
    "self-signed, blocked": 'tls = "on"\ncerts_dir = "blocker/certs"',
}
CLIENT_CA = {"none": "", "good": 'client_ca = ["tls/good.crt"]', "junk": 'client_ca = ["tls/junk.pem"]'}
LISTEN = ["127.0.0.1:0", "127.0.0.256:0", "192.0.2.1:0", "localhost:0"]
EMS = ["", "127.0.0.1:0", "host.invalid:0"]
DATA = {"good": "data", "under a file": "blocker/data", "bad database": "bad"}
BACKEND_CLIENT = {"none": "", "good": 'client_cert = "tls/good.crt"\nclient_key = "tls/good.key"',
                  "key missing": 'client_cert = "tls/good.crt"\nclient_key = "tls/gone.key"'}


def _files(site: Path) -> None:
    tls = site / "tls"
    tls.mkdir(parents=True)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=400)
    for name, issued in (("good", certs.create_server({"CN": "gw"}, ["localhost"], days=30)),
                         ("other", certs.create_server({"CN": "gw"}, ["localhost"], days=30)),
                         ("old", certs.create_server({"CN": "gw"}, ["localhost"], days=30, now=past))):
        certs.write(issued, tls / f"{name}.crt", tls / f"{name}.key")
    (tls / "junk.pem").write_text("not a certificate\n")
    (site / "blocker").write_text("a file where a directory should be\n")
    (site / "bad").mkdir()
    (site / "bad" / "queue.sqlite3").write_bytes(b"not a database, " * 512)


def _text(tls: str, client_ca: str, listen: str, ems: str, data: str, offline: bool, backend_client: str) -> str:
    server = TLS[tls] + ("\n" + CLIENT_CA[client_ca] if CLIENT_CA[client_ca] else "")
    ems_table = f'[ems]\nmodbus_listen = "{ems}"\n[site]\nmax_current = 32\n' if ems else ""
    return (f'[server]\nlisten = "{listen}"\n{server}\n[metrics]\nlisten = "127.0.0.1:0"\n{ems_table}'
            f'[offline]\nenabled = {str(offline).lower()}\ndata_dir = "{DATA[data]}"\n'
            f'[backend]\nurl = "wss://127.0.0.1:9/ocpp"\n{BACKEND_CLIENT[backend_client]}\n'
            '[[chargers]]\nid = "CP1"\npassword = "0123456789abcdef0123"\n')


def _check_config(text: str, site: Path) -> tuple[Config | None, list[str]]:
    """What check-config reports (and `run` before it starts), with the config when the schema took it."""
    try:
        config = loads(text, str(site / "site.toml"), base_dir=site)
    except ConfigError as error:
        return None, [problem.render(error.source) for problem in error.problems]
    return config, [problem.render("site.toml") for problem in preflight(config, LineIndex(text))]


def _start_failure(config: Config) -> str | None:
    """None if `run`'s start-up succeeds, else what stopped it."""
    failures: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start(config, nursery)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except* (OSError, StorageError) as group:
        failures = [str(exc) for exc in group.exceptions]
    return "; ".join(failures) or None


@settings(max_examples=40)
@given(st.sampled_from(list(TLS)), st.sampled_from(list(CLIENT_CA)), st.sampled_from(LISTEN), st.sampled_from(EMS),
       st.sampled_from(list(DATA)), st.booleans(), st.sampled_from(list(BACKEND_CLIENT)))
def test_check_config_refuses_exactly_what_start_up_refuses(tls: str, client_ca: str, listen: str, ems: str,
                                                             data: str, offline: bool, backend_client: str) -> None:
    with tempfile.TemporaryDirectory(prefix="ocpp-proxy-preflight-") as directory:
        site = Path(directory)
        _files(site)
        text = _text(tls, client_ca, listen, ems, data, offline, backend_client)
        config, problems = _check_config(text, site)
        assert not any("is required" in p or "unknown key" in p for p in problems), problems  # the test's own slip
        if config is None:  # a schema problem: run refuses it the same way, before starting anything
            assert problems
            return
        failure = _start_failure(config)
        assert bool(problems) == (failure is not None), (text, problems, failure)
