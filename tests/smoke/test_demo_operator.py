"""The demo as an operator meets it (issue 19, item 5): Ctrl-C stops it cleanly with its summary, each
line shows the part of the frame worth reading, and it says how its timing differs from a site's."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from proxy.config import SiteSettings
from proxy.demo.excerpt import Excerpts
from proxy.demo.run import DEMO_TIMING, LiveLog, demo_config, run_demo

ROOT = Path(__file__).resolve().parents[2]


class Lines:
    """The demo's stdout, line by line, as it arrives."""

    def __init__(self, process: trio.Process, errors: list[bytes]) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.errors = errors
        self.lines: list[str] = []
        self._buffer = b""

    async def until(self, pattern: str) -> str:
        with trio.fail_after(60):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                chunk = await self.stream.receive_some(65536)
                assert chunk, f"stdout closed before {pattern!r}: {self.lines[-20:]} {b''.join(self.errors)!r}"
                self._buffer += chunk
                *done, self._buffer = self._buffer.split(b"\n")
                self.lines += [line.decode() for line in done]

    async def rest(self) -> str:
        with trio.fail_after(60):
            while chunk := await self.stream.receive_some(65536):
                self._buffer += chunk
        return "\n".join(self.lines) + "\n" + self._buffer.decode()


async def _forever(signals: int) -> tuple[int, str, str]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy", "demo", "--forever", "--wallboxes", "2"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors: list[bytes] = []

    async def read_stderr() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(65536):
            errors.append(bytes(chunk))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stderr)
            lines = Lines(process, errors)
            # both OCPP wallboxes are mid-transaction (signals=1); the Modbus car charges for 2.4 s more,
            # the window for a second Ctrl-C (signals=2)
            await lines.until(r"CP002 .* StartTransaction\.conf" if signals == 1 else r"HD001 .* StartTransaction\.conf")
            process.send_signal(signal.SIGINT)
            if signals == 2:
                await lines.until("Ctrl-C again to stop at once")
                process.send_signal(signal.SIGINT)
            out = await lines.rest()
            with trio.fail_after(60):
                code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return code, out, b"".join(errors).decode()


async def test_ctrl_c_stops_demo_forever_with_its_summary() -> None:
    code, out, errors = await _forever(signals=1)
    assert code == 0, out[-2000:] + errors
    assert "Traceback" not in errors + out and "ExceptionGroup" not in errors + out
    assert "stopping: each wallbox finishes its transaction, then the summary" in out
    summary = out[out.index("wallbox  frames→backend"):]
    assert re.search(r"^CP001 +\d+ +\d+  yes ", summary, re.MULTILINE)
    assert re.search(r"^CP002 +\d+ +\d+  yes ", summary, re.MULTILINE)
    assert out.rstrip().endswith("all frames arrived byte-identical")
    # every transaction that started was finished before the summary
    for cp_id in ("CP001", "CP002"):
        started = len(re.findall(rf"{cp_id} +─▶ backend  StartTransaction\.req", out))
        assert started >= 1 and started == len(re.findall(rf"{cp_id} +─▶ backend  StopTransaction\.req", out))


async def test_a_second_ctrl_c_stops_at_once_without_a_traceback() -> None:
    code, out, errors = await _forever(signals=2)
    assert code == 130, out[-2000:] + errors
    assert "Traceback" not in errors + out and "ExceptionGroup" not in errors + out
    assert out.rstrip().endswith("stopped at once: no summary")


def test_demo_lines_show_the_meaningful_part() -> None:
    out = io.StringIO()
    assert run_demo(wallboxes=2, out=out) == 0
    lines = out.getvalue().splitlines()

    def backend_lines(cp_id: str, arrow: str, head: str) -> list[str]:
        return [line for line in lines if re.search(rf"{cp_id} +{arrow} backend  {re.escape(head)}", line)]

    for cp_id in ("CP001", "CP002", "HD001"):
        (authorized,) = backend_lines(cp_id, "◀─", "Authorize.conf")
        assert authorized.endswith("Authorize.conf idTagInfo.status=Accepted")
        (started,) = backend_lines(cp_id, "◀─", "StartTransaction.conf")
        assert re.search(r"StartTransaction\.conf idTagInfo\.status=Accepted transactionId=\d+$", started)
        (start,) = backend_lines(cp_id, "─▶", "StartTransaction.req")
        assert re.search(r"StartTransaction\.req idTag=\S+ connectorId=1 meterStart=\d+", start)
    ended = backend_lines("CS201", "◀─", "TransactionEvent.conf idTokenInfo.status=Accepted")
    assert ended  # the 2.0.1 station's answers name their status too
    assert all("limit " in line and line.endswith(")") for line in lines if "◀─ proxy" in line)


def test_excerpts_name_answers_by_their_call_and_put_the_status_first() -> None:
    excerpts = Excerpts()
    profile = ('[2,"p1","SetChargingProfile",{"connectorId":0,"csChargingProfiles":{"chargingProfileId":7,'
               '"stackLevel":1,"chargingProfilePurpose":"TxDefaultProfile","chargingProfileKind":"Absolute",'
               '"chargingSchedule":{"chargingRateUnit":"A","chargingSchedulePeriod":[{"startPeriod":0,'
               '"limit":11.5}]}}}]')
    call = excerpts.excerpt("CP1", profile)
    assert str(call).startswith("SetChargingProfile.req limit=11.5 chargingRateUnit=A connectorId=0")
    # cut to the room there is, but never before the first three fields
    assert call.fit(20) == "SetChargingProfile.req limit=11.5 chargingRateUnit=A connectorId=0 …"
    assert call.fit(1000) == str(call)
    answer = excerpts.excerpt("CP1", '[3,"p1",{"status":"Rejected"}]')
    assert str(answer) == "SetChargingProfile.conf status=Rejected"
    assert str(excerpts.excerpt("CP1", '[4,"x","NotImplemented","no such thing",{}]')) == \
        "? CALLERROR NotImplemented: no such thing"
    long_value = "A" * 300
    shown = excerpts.excerpt("CP1", f'[2,"d","DataTransfer",{{"data":"{long_value}","vendorId":"v"}}]')
    assert str(shown) == f"DataTransfer.req vendorId=v data={'A' * 23}…"
    assert str(excerpts.excerpt("CP1", "not json")) == "not json"
    # On an 80-column terminal the answer still shows its status and the transaction id.
    out = io.StringIO()
    live = LiveLog(out, width=80)
    live.frame("CP001", "received", '[2,"7","StartTransaction",{"connectorId":1,"idTag":"04A2B3C4D50001",'
                                     '"meterStart":2935600,"timestamp":"2026-11-27T05:34:21.657Z"}]')
    live.frame("CP001", "sent", '[3,"7",{"transactionId":1001,"idTagInfo":{"status":"Accepted"}}]')
    request, answer_line = out.getvalue().splitlines()
    assert request.endswith("StartTransaction.req idTag=04A2B3C4D50001 connectorId=1 meterStart=2935600 …")
    assert answer_line.endswith("StartTransaction.conf idTagInfo.status=Accepted transactionId=1001")


def test_demo_says_what_it_changed_from_a_sites_defaults() -> None:
    site = {name: getattr(SiteSettings(max_current=32), name) for name in DEMO_TIMING}
    assert all(site[name] != value for name, value in DEMO_TIMING.items())  # they are changes
    out = io.StringIO()
    assert run_demo(wallboxes=1, out=out) == 0
    banner = out.getvalue().splitlines()[1]
    assert banner.startswith("demo timing, not a site's: ")
    assert re.fullmatch(r"status page: http://127\.0\.0\.1:\d+/ \(JSON: /api/status\), up while the demo runs",
                        out.getvalue().splitlines()[2])
    for name, value in DEMO_TIMING.items():
        assert re.search(rf"{name} {value:g} \w \(a site's default: {site[name]:g} \w\)", banner), name
    real = demo_config(1, 1, "/tmp/x", real_timing=True)
    assert not any(name in real for name in DEMO_TIMING)
    out = io.StringIO()
    assert run_demo(wallboxes=1, out=out, real_timing=True) == 0
    assert out.getvalue().splitlines()[1].startswith("load management with a site's default timing: ")
