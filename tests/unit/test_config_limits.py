"""The load-management keys: defaults, an absent [site], and errors that name key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, loads
from proxy.loadmgmt.driver import charger_limits, load_management, site_limits

BASE = '[backend]\nurl = "ws://backend.example/ocpp"\n'


def test_no_site_section_means_no_load_management() -> None:
    config = loads(BASE + '[[chargers]]\nid = "CP1"\n')
    assert config.site is None and not load_management(config)


def test_site_and_charger_keys() -> None:
    config = loads(BASE + '[site]\nmax_current = 35\nfallback_current = 0\nfail_closed = true\n'
                   '[[chargers]]\nid = "CP1"\nmax_current = 32\nmin_current = 8\nphases = 1\nfirst_phase = 2\n'
                   'priority = 2\nenabled = false\non_disable = "block"\nstrategy = "tx-default"\nunit = "W"\n')
    assert load_management(config)
    site = site_limits(config)
    assert (site.max_current, site.phases, site.fallback_current, site.fail_closed, site.meter) == (
        35.0, 3, 0.0, True, False)
    assert site_limits(loads(BASE + "[site]\nmax_current = 20\n")).fallback_current is None  # -1: min_current
    limits = charger_limits(config.chargers[0])
    assert (limits.max_current, limits.min_current, limits.phases, limits.first_phase, limits.priority) == (
        32.0, 8.0, 1, 2, 2)
    assert not limits.enabled and limits.managed  # block: still managed, at 0
    assert (config.chargers[0].strategy, config.chargers[0].unit) == ("tx-default", "W")


def test_errors_name_key_and_line() -> None:
    text = (BASE + "[site]\nphases = 2\nhysteresis = -1\nstrategy = \"fastest\"\n"
            '[[chargers]]\nid = "CP1"\nmin_current = 20\non_disable = "explode"\nphases = 4\n')
    with pytest.raises(ConfigError) as caught:
        loads(text, "site.toml")
    rendered = str(caught.value)
    for expected in ("site.toml:3: site.max_current: is required",
                     "site.toml:4: site.phases: must be 1 or 3",
                     "site.toml:5: site.hysteresis: must be 0 or greater",
                     "site.toml:6: site.strategy: must be one of max-profile, tx-default",
                     "site.toml:10: chargers[0].on_disable: must be one of clear, block",
                     "site.toml:11: chargers[0].phases: must be 1, 2 or 3",
                     "site.toml:9: chargers[0].min_current: is above max_current (16.0)"):
        assert expected in rendered, rendered


def test_check_config_warns_when_the_site_cannot_hold_a_minimum_or_all_minimums() -> None:
    from proxy.config import LineIndex, site_warnings

    text = ('[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n[site]\nmax_current = 10\n'
            '[[chargers]]\nid = "CP1"\nmin_current = 6\n'
            '[[chargers]]\nid = "CP2"\nmax_current = 16\nmin_current = 12\n'
            '[[chargers]]\nid = "CP3"\nphases = 1\nfirst_phase = 2\n')
    warnings = site_warnings(loads(text), LineIndex(text))
    assert [(w.key, w.line) for w in warnings] == [("chargers[1].min_current", 11), ("site.max_current", 4)]
    assert "can never charge" in warnings[0].message
    assert "phase L2 (24 A)" in warnings[1].message  # CP3 is single-phase on L2 and "wait at 0 A" in warnings[1].message
    fits = text.replace("max_current = 10", "max_current = 40")
    assert site_warnings(loads(fits), LineIndex(fits)) == []
    assert site_warnings(loads(text.split("[site]")[0] + '[[chargers]]\nid = "X"\n'), LineIndex("")) == []


def test_check_config_prints_the_site_warnings_and_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    path = tmp_path / "site.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:0"\n[backend]\nurl = "ws://127.0.0.1:9/ocpp"\n'
                    '[offline]\ndata_dir = "data"\n[site]\nmax_current = 10\n'
                    '[[chargers]]\nid = "CP1"\nmin_current = 6\n[[chargers]]\nid = "CP2"\nmin_current = 6\n',
                    encoding="utf-8")
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}:8: site.max_current: 10 A is below the sum of the chargers' min_current on phase L1" \
        in err
