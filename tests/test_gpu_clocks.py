"""The nvidia-smi clock sampler, against a stand-in nvidia-smi script (CI has no GPU)."""

import stat
import time

from experiments import gpu_clocks

FAKE = """#!/bin/sh
case "$*" in *{reject}*) echo "Field is not a valid field to query." ; exit 2 ;; esac
case "$*" in
  *-lms*) while true; do echo "0, 1980, 3201, 650.5, 61, 0x0000000000000000";
                         echo "1, 1755, 3201, 699.0, 70, 0x0000000000000004"; sleep 0.01; done ;;
  *) echo "0, 345, 3201, 80.0, 30, 0x0000000000000001" ;;
esac
"""


def fake_smi(tmp_path, reject="nothing-rejected"):
    path = tmp_path / "nvidia-smi"
    path.write_text(FAKE.format(reject=reject))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_parse_line():
    s = gpu_clocks.parse_line("3, 1980, 3201, 650.5, 61, 0x0000000000000004")
    assert s == dict(gpu=3, sm_mhz=1980.0, mem_mhz=3201.0, power_w=650.5, temp_c=61.0, reasons=4)
    assert gpu_clocks.parse_line("0, [N/A], 3201, 1, 2, 0x0") is None
    assert gpu_clocks.parse_line("garbage") is None


def test_sampler_phases_and_summary(tmp_path):
    sampler = gpu_clocks.ClockSampler(period_ms=10, command=fake_smi(tmp_path))
    assert sampler.available and sampler.fields == gpu_clocks.FIELDS
    with sampler.phase("copies"):
        time.sleep(0.3)
    summary = sampler.summary()["copies"]
    assert set(summary) == {0, 1}
    assert summary[0]["sm_mhz"] == 1980 and summary[0]["limited_frac"] == 0
    assert summary[1]["sm_mhz"] == 1755 and summary[1]["limited_frac"] == 1  # 0x4: power cap
    assert summary[1]["samples"] >= 3
    assert "copies" in sampler.table()


def test_sampler_falls_back_to_old_field_name(tmp_path):
    sampler = gpu_clocks.ClockSampler(command=fake_smi(tmp_path, reject="clocks_event_reasons"))
    assert sampler.fields[-1] == gpu_clocks.OLD_REASONS_FIELD


def test_sampler_without_nvidia_smi_is_a_no_op(tmp_path):
    sampler = gpu_clocks.ClockSampler(command=str(tmp_path / "absent"))
    assert not sampler.available
    with sampler.phase("x"):
        pass
    assert sampler.summary() == {}
