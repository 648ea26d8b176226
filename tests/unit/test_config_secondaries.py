"""Config of several backends per wallbox: named and inline secondaries, policies, conflicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, loads

SITE = """
[backend]
url = "wss://billing.example/ocpp"

[backends.ems]
url = "ws://ems.local:9000/ocpp"
password_env = "EMS_PW"
forward_actions = ["BootNotification", "StatusNotification", "MeterValues", "StartTransaction", "StopTransaction"]
policy = { RemoteStartTransaction = "forward", "*" = "answer" }

[backends.ha]
url = "ws://ha.local:8123/ocpp"
identity = "wallbox-garage"

[[chargers]]
id = "CP001"
upstream_id = "DE*ABC*E1"
secondaries = ["ems", "ha"]

[[chargers]]
id = "CP002"
[[chargers.secondary]]
name = "broker"
url = "wss://kwh-broker.example/ws"
password_file = "broker.pw"
[chargers.secondary.policy]
GetCompositeSchedule = "reject"
"""


def test_named_and_inline_secondaries_resolve(tmp_path: Path) -> None:
    (tmp_path / "broker.pw").write_text("broker-secret\n")
    config = loads(SITE, environ={"EMS_PW": "ems-secret"}, base_dir=tmp_path)
    first = config.secondaries_for(config.chargers[0])
    assert [s.name for s in first] == ["ems", "ha"]
    ems, ha = first
    assert (ems.target.url, ems.target.identity, ems.target.password) == (
        "ws://ems.local:9000/ocpp/DE*ABC*E1", "DE*ABC*E1", "ems-secret")
    assert ems.forward_actions == frozenset({"BootNotification", "StatusNotification", "MeterValues",
                                             "StartTransaction", "StopTransaction"})
    assert ems.settings.policy == {"RemoteStartTransaction": "forward", "*": "answer"}
    assert (ha.target.url, ha.forward_actions, ha.settings.queue_limit) == (
        "ws://ha.local:8123/ocpp/wallbox-garage", None, 1000)
    (broker,) = config.secondaries_for(config.chargers[1])
    assert (broker.name, broker.target.url, broker.target.password) == (
        "broker", "wss://kwh-broker.example/ws/CP002", "broker-secret")
    assert broker.settings.policy == {"GetCompositeSchedule": "reject"}
    assert "secret" not in repr(broker.target)
    assert config.primary_policy(config.chargers[0]) == {}


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "site.toml", environ={})
    return [p.render("site.toml") for p in info.value.problems]


def test_two_upstreams_sending_charging_profiles_are_refused_naming_both() -> None:
    text = ('[backend]\nurl = "ws://billing/ocpp"\n'           # 1-2
            '[backends.ems]\nurl = "ws://ems/ocpp"\n'          # 3-4
            'policy = { SetChargingProfile = "forward" }\n'    # 5
            '[[chargers]]\nid = "CP1"\nsecondaries = ["ems"]\n')
    (message,) = errors(text)
    assert message.startswith("site.toml:5: backends.ems.policy.SetChargingProfile: upstreams 'primary'")
    assert "'ems' (backends.ems)" in message and "charging profiles" in message and "'CP1'" in message


@pytest.mark.parametrize("action,state", [("Reset", "Reset"), ("UpdateFirmware", "firmware"),
                                          ("ChangeAvailability", "availability"),
                                          ("ChangeConfiguration", "configuration changes"),
                                          ("ClearChargingProfile", "charging profiles")])
def test_every_exclusive_kind_of_state_is_checked(action: str, state: str) -> None:
    text = (f'[backend]\nurl = "ws://billing/ocpp"\n[[chargers]]\nid = "CP1"\n'
            f'[[chargers.secondary]]\nname = "ha"\nurl = "ws://ha/ocpp"\n[chargers.secondary.policy]\n'
            f'{action} = "forward"\n')
    (message,) = errors(text)
    assert message.startswith(f"site.toml:9: chargers[0].secondary[0].policy.{action}: ")
    assert f"may both send {state}" in message and "'primary'" in message and "'ha'" in message


def test_handing_a_state_to_a_secondary_is_accepted_and_two_secondaries_conflict() -> None:
    handed_over = ('[backend]\nurl = "ws://billing/ocpp"\npolicy = { SetChargingProfile = "reject", '
                   'ClearChargingProfile = "reject" }\n'
                   '[backends.ems]\nurl = "ws://ems/ocpp"\npolicy = { SetChargingProfile = "forward", '
                   'ClearChargingProfile = "forward" }\n'
                   '[[chargers]]\nid = "CP1"\nsecondaries = ["ems"]\n')
    config = loads(handed_over)
    assert config.primary_policy(config.chargers[0])["SetChargingProfile"] == "reject"
    both = handed_over.replace('secondaries = ["ems"]', 'secondaries = ["ems"]\n[[chargers.secondary]]\n'
                               'name = "ha"\nurl = "ws://ha/ocpp"\npolicy = { "*" = "forward" }')
    problems = errors(both)
    assert any("upstreams 'ems' (backends.ems) and 'ha' (chargers[0].secondary[0]) may both send charging"
               in p and p.startswith("site.toml:13: chargers[0].secondary[0].policy.*") for p in problems)
    assert any("'primary' (backend) and 'ha'" in p and "Reset" in p for p in problems)
    # A charger-level primary policy restricts just that charger.
    per_charger = both.replace('id = "CP1"', 'id = "CP1"\nupstream_policy = { "*" = "reject" }')
    assert all("'primary'" not in p for p in errors(per_charger))


def test_bad_secondary_settings_name_key_and_line() -> None:
    text = ('[backend]\nurl = "ws://billing/ocpp"\n'                                    # 1-2
            '[backends.primary]\nurl = "ws://x/ocpp"\n'                                 # 3-4
            '[backends.ems]\nforward_actions = ["MeterValue"]\n'                        # 5-6
            'policy = { Reset = "allow", Boot = "forward" }\n'                          # 7
            '[backends.ha]\nurl = "ws://ha/ocpp"\nforward_actions = ["StopTransaction"]\n'  # 8-10
            '[[chargers]]\nid = "CP1"\nsecondaries = ["ems", "nope", "ems"]\n'          # 11-13
            '[[chargers.secondary]]\nname = "ems"\nurl = "ws://x/ocpp"\n'               # 14-16
            '[[chargers.secondary]]\nname = "bad name"\n')                             # 17-18
    assert errors(text) == [
        "site.toml:6: backends.ems.forward_actions: unknown OCPP action 'MeterValue'",
        "site.toml:10: backends.ha.forward_actions: StartTransaction and StopTransaction go together "
        "(a transaction history needs both)",
        "site.toml:3: backends.primary: name must be 1-40 of A-Z a-z 0-9 _ - and not primary, wallbox or proxy",
        "site.toml:7: backends.ems.policy.Reset: must be one of forward, answer, reject; got 'allow'",
        "site.toml:7: backends.ems.policy.Boot: not a command a backend sends to a wallbox (nor \"*\")",
        "site.toml:5: backends.ems.url: is required",
        "site.toml:13: chargers[0].secondaries[1]: no [backends.nope] table (defined: ems, ha, primary)",
        "site.toml:13: chargers[0].secondaries[2]: 'ems' is listed twice",
        "site.toml:15: chargers[0].secondary[0].name: 'ems' is already a secondary of this charger (backends.ems)",
        "site.toml:18: chargers[0].secondary[1].name: must be 1-40 of A-Z a-z 0-9 _ - and not primary, wallbox "
        "or proxy",
        "site.toml:17: chargers[0].secondary[1].url: is required",
    ]


def test_check_config_refuses_a_conflict_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[backend]\nurl = "ws://billing/ocpp"\n[backends.ems]\nurl = "ws://ems/ocpp"\n'
                    'policy = { Reset = "forward" }\n[[chargers]]\nid = "CP1"\nsecondaries = ["ems"]\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)], capture_output=True,
                            text=True, cwd=Path(__file__).parents[2], timeout=60)
    assert result.returncode == 2
    assert f"{path}:5: backends.ems.policy.Reset: upstreams 'primary' (backend) and 'ems' (backends.ems)" \
        in result.stderr


def test_the_documented_example_loads() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "several-backends.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    config = loads(example, environ={"EMS_PASSWORD": "x"})
    assert [t.name for t in config.secondaries_for(config.chargers[0])] == ["ems", "ha"]
