import os
from pathlib import Path

from llmos_edge.sensors import Sensors, memory, pressure, thermal_zones, throttle_flags


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def board(root: Path) -> None:
    """A fake Pi-like tree: two zones (one with trip points), two CPUs' cpufreq, PSI, meminfo, cgroup v2."""
    write(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", "61250\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_0_type", "passive\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_0_temp", "80000\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_1_type", "critical\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_1_temp", "110000\n")
    write(root, "sys/class/thermal/thermal_zone1/type", "rp1_adc\n")
    write(root, "sys/class/thermal/thermal_zone1/temp", "48000\n")
    for cpu in ("cpu0", "cpu1"):
        write(root, f"sys/devices/system/cpu/{cpu}/cpufreq/scaling_cur_freq", "1500000\n")
        write(root, f"sys/devices/system/cpu/{cpu}/cpufreq/cpuinfo_max_freq", "2400000\n")
    write(
        root,
        "proc/pressure/memory",
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=4.25 avg60=1.00 avg300=0.10 total=45\n",
    )
    write(root, "proc/pressure/cpu", "some avg10=30.00 avg60=20.00 avg300=10.00 total=999\n")
    write(root, "proc/meminfo", "MemTotal:        4000000 kB\nMemFree:  100 kB\nMemAvailable:    1000000 kB\n")
    write(root, "proc/self/cgroup", "0::/system.slice/llmos.service\n")
    write(root, "sys/fs/cgroup/system.slice/llmos.service/memory.max", str(600 * 2**20) + "\n")
    write(root, "sys/fs/cgroup/system.slice/llmos.service/memory.current", str(500 * 2**20) + "\n")
    write(root, "sys/fs/cgroup/system.slice/llmos.service/memory.stat", f"anon 1\ninactive_file {50 * 2**20}\n")


def test_a_fake_board_reads_completely(tmp_path: Path) -> None:
    board(tmp_path)
    r = Sensors(tmp_path, vcgencmd=None).read()
    assert [(z.name, z.type, z.celsius) for z in r.zones] == [
        ("thermal_zone0", "cpu-thermal", 61.25),
        ("thermal_zone1", "rp1_adc", 48.0),
    ]
    assert [(t.type, t.celsius) for t in r.zones[0].trips] == [("passive", 80.0), ("critical", 110.0)]
    assert r.zone() == r.zones[0]  # the hottest
    assert r.zone("rp1_adc") == r.zones[1] and r.zone("thermal_zone1") == r.zones[1] and r.zone("nope") is None
    assert [(c.cpu, c.cur_khz, c.max_khz) for c in r.cpufreq] == [
        ("cpu0", 1500000, 2400000),
        ("cpu1", 1500000, 2400000),
    ]
    assert r.psi_memory is not None and r.psi_memory.some_avg10 == 12.5 and r.psi_memory.full_avg10 == 4.25
    assert r.psi_cpu is not None and r.psi_cpu.some_avg10 == 30.0 and r.psi_cpu.full_avg10 == 0.0
    assert r.memory is not None and r.memory.total == 4000000 * 1024 and r.memory.available == 1000000 * 1024
    # cgroup: 600 MiB limit, 500 MiB used of which 50 MiB is reclaimable cache -> 150 MiB of room, less than the
    # machine's available memory, so that is the headroom.
    assert r.memory.cgroup_limit == 600 * 2**20 and r.memory.cgroup_current == 450 * 2**20
    assert r.memory.headroom == 150 * 2**20
    assert r.throttle is None


def test_no_sensors_is_a_state_not_an_error(tmp_path: Path) -> None:
    r = Sensors(tmp_path, vcgencmd=None).read()
    assert r.zones == () and r.zone() is None and r.cpufreq == ()
    assert r.psi_memory is None and r.psi_cpu is None and r.throttle is None


def test_an_unreadable_zone_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "garbage\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "40000\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/type", "no-temp-file\n")
    assert [(z.name, z.type) for z in thermal_zones(tmp_path)] == [("thermal_zone1", "unknown")]


def test_zones_sort_numerically(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        write(tmp_path, f"sys/class/thermal/thermal_zone{n}/temp", f"{n}000\n")
    assert [z.name for z in thermal_zones(tmp_path)] == ["thermal_zone1", "thermal_zone2", "thermal_zone10"]


def test_cgroup_v1_limit_and_unlimited(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "5:cpu:/\n4:memory:/llmos\n0::/\n")
    d = "sys/fs/cgroup/memory/llmos/"
    write(tmp_path, d + "memory.limit_in_bytes", str(256 * 2**20))
    write(tmp_path, d + "memory.usage_in_bytes", str(200 * 2**20))
    write(tmp_path, d + "memory.stat", f"cache 1\ntotal_inactive_file {10 * 2**20}\n")
    m = memory(tmp_path)
    assert m.cgroup_limit == 256 * 2**20 and m.cgroup_current == 190 * 2**20
    write(tmp_path, d + "memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    assert memory(tmp_path).cgroup_limit is None


def test_cgroup_v2_max_means_unlimited(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "0::/a\n")
    write(tmp_path, "sys/fs/cgroup/a/memory.max", "max\n")
    write(tmp_path, "sys/fs/cgroup/a/memory.current", "1000\n")
    m = memory(tmp_path)
    assert m.cgroup_limit is None and m.headroom == m.available


def test_pressure_file_without_full_line(tmp_path: Path) -> None:
    write(tmp_path, "proc/pressure/cpu", "some avg10=1.50 avg60=0.50 avg300=0.00 total=7\n")
    p = pressure(tmp_path, "cpu")
    assert p is not None and p.some_avg10 == 1.5 and p.full_avg10 == 0.0
    assert pressure(tmp_path, "io") is None


def test_raspberry_pi_throttle_flags_from_vcgencmd(tmp_path: Path) -> None:
    script = tmp_path / "vcgencmd"
    script.write_text('#!/bin/sh\n[ "$1" = get_throttled ] && echo throttled=0x50005\n')
    os.chmod(script, 0o755)
    t = throttle_flags(str(script))
    assert t is not None and t.raw == 0x50005
    assert t.now == ("under-voltage", "throttled")
    assert "under-voltage has occurred" in t.flags and "throttling has occurred" in t.flags
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho nonsense\n")
    os.chmod(broken, 0o755)
    assert throttle_flags(str(broken)) is None
    assert throttle_flags(None) is None
    assert throttle_flags(str(tmp_path / "missing")) is None
