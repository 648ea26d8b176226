"""Admission decisions: ids, passwords, subprotocols."""

from __future__ import annotations

import base64

from proxy.wire.closecodes import mirror, truncate
from proxy.config import loads
from proxy.core.admission import Admit, Refuse, basic_password, charge_box_id, decide

CONFIG = loads('[backend]\nurl = "ws://b/ocpp"\n[[chargers]]\nid = "CP*1"\npassword = "secret-password-16"\n'
               '[[chargers]]\nid = "OPEN"\n')


def auth(password: str, user: str = "CP*1") -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))]


def test_charge_box_id_is_last_segment_decoded() -> None:
    assert charge_box_id("/ocpp/CP%2A1?x=1") == "CP*1"
    assert charge_box_id("/a/b/c/") is None  # "/ocpp/" names no id (it is not "ocpp")
    assert charge_box_id("/") is None


def test_decisions() -> None:
    offered = ["ocpp1.6"]
    assert isinstance(decide(CONFIG, "/ocpp/CP%2A1", auth("secret-password-16"), offered), Admit)
    assert decide(CONFIG, "/ocpp/CP%2A1", [], offered).status == 401  # type: ignore[union-attr]
    wrong = decide(CONFIG, "/ocpp/CP%2A1", auth("secret-password-17"), offered)
    assert isinstance(wrong, Refuse) and wrong.reason == "password_wrong" and wrong.headers
    assert "secret" not in wrong.detail
    assert decide(CONFIG, "/ocpp/UNKNOWN", [], offered).status == 404  # type: ignore[union-attr]
    assert decide(CONFIG, "/ocpp/OPEN", [], ["ocpp2.0", "ocpp1.5"]).status == 400  # type: ignore[union-attr]
    admitted = decide(CONFIG, "/ocpp/OPEN", [], ["ocpp2.0", "ocpp1.6"])
    assert isinstance(admitted, Admit) and admitted.subprotocols == ("ocpp1.6",)


def test_basic_password_parsing() -> None:
    assert basic_password(auth("a:b:c")) == b"a:b:c"
    assert basic_password([(b"authorization", b"Bearer x")]) is None
    assert basic_password([(b"authorization", b"Basic !!!")]) is None


def test_close_code_mirroring() -> None:
    assert mirror(4000, "custom", "wallbox") == (4000, "custom")
    assert mirror(1006, None, "wallbox") == (1001, "wallbox connection lost")
    assert mirror(1005, None, "primary") == (1000, "")
    assert mirror(1004, "x", "primary") == (1001, "primary closed with 1004")
    assert len(truncate("€" * 100).encode()) <= 123


def test_a_virtual_charge_points_id_is_refused() -> None:
    config = loads('[server]\naccept_unknown = true\n[backend]\nurl = "ws://b/ocpp"\n'
                   '[[modbus_chargers]]\nid = "HD1"\nmodbus = "127.0.0.1:502"\n')
    refusal = decide(config, "/ocpp/HD1", [], ["ocpp1.6"])
    assert isinstance(refusal, Refuse) and refusal.status == 409 and refusal.reason == "virtual_charge_point"
    assert isinstance(decide(config, "/ocpp/OTHER", [], ["ocpp1.6"]), Admit)
