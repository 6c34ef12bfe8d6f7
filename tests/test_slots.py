"""The verdict on a booted root slot (kiosk.device.slots.commit): its decisions, with the health check and
RAUC's marks replaced by records. The same code runs booted on the qemu target with real RAUC, GRUB and
systemd in tests/test_update_boot.py (kept, rolled back, fallen back after a reset)."""

from __future__ import annotations

import json

import pytest

from kiosk.device import slots


class Health:
    """The push's health check, answering what the test says."""

    def __init__(self, problems=()):
        self.problems = list(problems)
        self.asked = []

    def health(self, units, settle):
        self.asked.append(list(units))
        return self.problems


def status(booted="A", primary=None, a=None, b=None):
    return {"booted": booted, "primary": primary,
            "slots": {"A": {"bootStatus": "good", "installed": None, "version": None, **(a or {})},
                      "B": {"bootStatus": "bad", "installed": None, "version": None, **(b or {})}}}


@pytest.fixture
def device(tmp_path):
    (tmp_path / "var/lib/kiosk").mkdir(parents=True)
    return tmp_path


def verdict(device, cmdline, st, problems=()):
    marks, reboots, lines = [], [], []
    code = slots.commit(device, Health(problems), lines.append, cmdline=cmdline, status=st, limit=60, settle=0,
                        mark=lambda state, which="booted": marks.append(state if which == "booted" else
                                                                        f"{state} {which}"),
                        reboot=lambda: reboots.append(True), startup=lambda *a: None)
    return code, marks, reboots, slots.read_record(device), lines


def test_a_kiosk_without_slots_has_nothing_to_commit(device):
    code, marks, reboots, record, lines = verdict(device, "root=UUID=x rw quiet", status())
    assert (code, marks, reboots, record) == (0, [], [], {})
    assert "no root slots" in lines[0]


def test_the_flashed_slot_is_committed_once_healthy(device):
    code, marks, reboots, record, _ = verdict(device, "root=/dev/vda2 rauc.slot=A quiet", status())
    assert (code, marks, reboots) == (0, ["good"], [])
    assert record["A"]["state"] == "good" and record["A"]["version"] == "as flashed"


def test_a_new_slot_that_is_healthy_is_kept(device):
    slots.record(device, "A", "good", installed=None)
    st = status("B", "B", b={"installed": "2026-12-05T10:00:00Z", "version": "abc", "bootStatus": "bad"})
    code, marks, reboots, record, _ = verdict(device, "rauc.slot=B", st)
    assert (code, marks, reboots) == (0, ["good"], [])
    assert record["B"] == {**record["B"], "state": "good", "version": "abc", "installed": "2026-12-05T10:00:00Z"}


def test_a_new_slot_that_is_not_healthy_is_marked_bad_and_left_for_the_good_one(device):
    slots.record(device, "A", "good", installed=None)
    st = status("B", "B", b={"installed": "T1", "version": "abc"})
    code, marks, reboots, record, lines = verdict(device, "rauc.slot=B", st, ["kiosk.service: restarted 3 time(s)"])
    assert (code, marks, reboots) == (1, ["bad"], [True])
    assert record["B"]["state"] == "bad" and record["B"]["reason"] == "kiosk.service: restarted 3 time(s)"
    # back on A: B's verdict stands (same install), A is checked and kept, nothing marks B again
    st = status("A", "A", b={"installed": "T1", "version": "abc", "bootStatus": "bad"})
    code, marks, reboots, record, _ = verdict(device, "rauc.slot=A", st)
    assert (code, marks, reboots) == (0, ["good"], [])
    assert record["B"]["reason"] == "kiosk.service: restarted 3 time(s)" and record["A"]["state"] == "good"


def test_a_slot_tried_and_never_judged_is_recorded_as_failed_by_the_other(device):
    """A hang, panic or power cut before the verdict: the boot loader came back to A by itself."""
    slots.record(device, "A", "good", installed=None)
    st = status("A", "B", b={"installed": "T2", "version": "def", "bootStatus": "bad"})
    code, marks, reboots, record, lines = verdict(device, "rauc.slot=A", st)
    assert (code, marks, reboots) == (0, ["bad other", "active", "good"], [])
    assert record["B"] == {**record["B"], "state": "bad", "reason": slots.FALLBACK_REASON, "installed": "T2"}
    assert any("slot B failed" in line for line in lines)


def test_a_slot_that_started_its_try_and_died_is_failed_too(device):
    slots.record(device, "A", "good", installed=None)
    slots.record(device, "B", "trying", installed="T3")
    st = status("A", "A", b={"installed": "T3", "bootStatus": "bad"})
    _, marks, _, record, _ = verdict(device, "rauc.slot=A", st)
    assert marks == ["bad other", "active", "good"] and record["B"]["state"] == "bad"


def test_an_unhealthy_slot_with_no_good_other_stays(device):
    """The first boot of a card whose program fails: rebooting would only loop."""
    code, marks, reboots, record, lines = verdict(device, "rauc.slot=A", status(), ["kiosk.service: failed"])
    assert (code, marks, reboots) == (1, [], [])
    assert record["A"]["state"] == "unhealthy" and "no better choice" in lines[-1]


def test_a_slot_written_again_is_judged_again(device):
    slots.record(device, "A", "good", installed=None)
    slots.record(device, "B", "good", installed="T1", version="old")
    st = status("B", "B", b={"installed": "T4", "version": "new"})
    _, marks, _, record, _ = verdict(device, "rauc.slot=B", st, ["kiosk-agent.service: failed"])
    assert marks == ["bad"] and record["B"]["installed"] == "T4" and record["B"]["version"] == "new"


def test_the_screen_switched_off_on_purpose_is_not_a_failure(device, monkeypatch):
    monkeypatch.setattr(slots.screen, "who_switched_off", lambda root: "schedule")
    health = Health()
    slots.commit(device, health, lambda line: None, cmdline="rauc.slot=A", status=status(), limit=60, settle=0,
                 mark=lambda state: None, startup=lambda *a: None)
    assert health.asked == [["kiosk-agent.service"]]


def test_a_kiosk_switched_off_by_the_schedule_during_the_check_is_not_a_failure(device):
    """A new slot booted inside display.schedule's off window: kiosk-screen-boot.service stops kiosk.service;
    should that happen while the verdict checks it, /run/kiosk-screen/off says so by then: the slot is kept,
    not rolled back for a screen dark on purpose. The same stop without the record is a failure."""
    slots.record(device, "A", "good", installed=None)
    st = status("B", "B", a={"bootStatus": "good"}, b={"installed": "T2", "bootStatus": "good"})

    class OffDuringTheCheck(Health):
        def health(self, units, settle):
            super().health(units, settle)
            (device / "run/kiosk-screen").mkdir(parents=True, exist_ok=True)
            (device / "run/kiosk-screen/off").write_text("schedule\n")
            return ["kiosk.service: inactive (dead), result success, exit status 0"]

    health, marks, lines = OffDuringTheCheck(), [], []
    code = slots.commit(device, health, lines.append, cmdline="rauc.slot=B", status=st, limit=60, settle=0,
                        mark=lambda state, which="booted": marks.append(state), startup=lambda *a: None)
    assert (code, marks) == (0, ["good"]) and slots.read_record(device)["B"]["state"] == "good"
    assert health.asked == [["kiosk.service", "kiosk-agent.service"]]
    assert "kiosk.service: stopped during the check, the screen was switched off (schedule)" in lines
    (device / "run/kiosk-screen/off").unlink()
    code, marks, reboots, record, _ = verdict(device, "rauc.slot=B", dict(st, slots=dict(
        st["slots"], B=dict(st["slots"]["B"], installed="T3"))), ["kiosk.service: inactive (dead)"])
    assert (code, marks, reboots) == (1, ["bad"], [True]) and record["B"]["state"] == "bad"


def test_rauc_status_json_is_read():
    """The shape rauc 1.8 prints (`rauc status --detailed --output-format=json`); the booted update test reads
    a kept install's bundle version through it (tests/test_update_boot.py)."""
    text = json.dumps({
        "compatible": "kiosk-qemu", "booted": "B", "boot_primary": "rootfs.1",
        "slots": [{"rootfs.0": {"class": "rootfs", "device": "/dev/vda2", "bootname": "A", "boot_status": "good",
                                "slot_status": {}}},
                  {"rootfs.1": {"class": "rootfs", "device": "/dev/vda3", "bootname": "B", "boot_status": "bad",
                                "slot_status": {"bundle": {"version": "abc"},
                                                "installed": {"timestamp": "2026-12-05T10:00:00Z"}}}}]})
    st = slots.parse_rauc_status(text)
    assert st["booted"] == "B" and st["primary"] == "B"
    assert st["slots"]["B"] == {"device": "/dev/vda3", "bootStatus": "bad", "version": "abc",
                                "installed": "2026-12-05T10:00:00Z"}
    with pytest.raises(slots.KioskError):
        slots.parse_rauc_status("Booted from: rootfs.0")
