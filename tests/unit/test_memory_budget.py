"""The memory budget on its own: pre-flight against a fake machine's memory, shedding fed readings directly (no
governor loop), admission, acting on recorded actuators.

Shedding through the governor's loop and a fake /proc is in test_governor.py; the estimate against a real worker in
tests/integration/test_governor.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmos_edge.config import GovernorConfig
from llmos_edge.errors import UserError
from llmos_edge.memory_budget import MemoryBudget, MemoryLevel
from llmos_edge.models import MIB, MIN_CONTEXT, GGUFInfo, estimate_memory
from llmos_edge.sensors import Memory, Pressure, Reading, Sensors
from tests.decisions import Decisions
from tests.unit.test_memory_estimate import llama


@dataclasses.dataclass
class Hands:
    """The two actuators the memory budget is given, recording what it did with them."""

    unloaded: list[str] = dataclasses.field(default_factory=list)
    reloads: int = 0

    @property
    def unload(self) -> Callable[[str], None]:
        return self.unloaded.append

    @property
    def reload(self) -> Callable[[], None]:
        def reload() -> None:
            self.reloads += 1

        return reload


@dataclasses.dataclass
class Req:
    priority: str = "interactive"
    max_tokens: int = 128


class Rig:
    def __init__(self, root: Path, **cfg: Any) -> None:
        self.cfg = dataclasses.replace(GovernorConfig(), sensors_root=str(root), **cfg)
        self.hands = Hands()
        self.decisions = Decisions()
        self.rows = self.decisions.rows
        self.mb = MemoryBudget(self.cfg, self.hands, self.decisions, Sensors(root, vcgencmd=None))

    def at(self, now: float, *, psi: tuple[float, float] = (0.0, 0.0), available_mib: float = 4096) -> None:
        some, full = psi
        reading = Reading(
            at=now,
            memory=Memory(total=8192 * MIB, available=int(available_mib * MIB)),
            psi_memory=Pressure(some_avg10=some, full_avg10=full),
        )
        self.mb.observe(reading, None)
        self.mb.step(now)


def machine(root: Path, *, total_mib: int, available_mib: int, cgroup_max_mib: int | None = None) -> None:
    """A fake /proc/meminfo and this process's cgroup (v2) under `root`."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/meminfo").write_text(f"MemTotal: {total_mib * 1024} kB\nMemAvailable: {available_mib * 1024} kB\n")
    (root / "proc/self/cgroup").write_text("0::/llmos\n")
    cg = root / "sys/fs/cgroup/llmos"
    cg.mkdir(parents=True, exist_ok=True)
    (cg / "memory.max").write_text("max\n" if cgroup_max_mib is None else f"{cgroup_max_mib * MIB}\n")


def model() -> tuple[GGUFInfo, int]:
    """A small llama model and what it needs at the smallest context, in MiB (rounded up)."""
    info = llama(512, 8, 8, 1536)
    return info, -(-estimate_memory(info, MIN_CONTEXT).total // MIB)


def test_levels_keep_the_numbers_and_words_events_have_always_used() -> None:
    assert [(int(v), v.measure, v.action) for v in MemoryLevel] == [
        (0, "no shedding", "calm"),
        (1, "shedding background work", "shed_background"),
        (2, "shortening new requests", "shorten_requests"),
        (3, "model unloaded", "unload"),
    ]
    assert json.dumps({"level": MemoryLevel.UNLOAD}) == '{"level": 3}'


def test_a_model_that_fits_the_device_but_not_now_is_told_apart_from_one_that_never_fits(tmp_path: Path) -> None:
    info, need = model()
    machine(tmp_path, total_mib=need + 200, available_mib=need // 2)
    rig = Rig(tmp_path, memory_reserve_mb=16)
    assert rig.mb.fits_ever(info) and not rig.mb.fits_now(info)
    assert rig.mb.ceiling() == (need + 200 - 16) * MIB
    machine(tmp_path, total_mib=need + 200, available_mib=need + 100)
    assert rig.mb.fits_now(info)
    machine(tmp_path, total_mib=8192, available_mib=need + 100, cgroup_max_mib=need // 2)  # MemoryMax: never
    assert not rig.mb.fits_ever(info) and rig.mb.ceiling() == (need // 2 - 16) * MIB


def test_beside_the_worker_its_memory_does_not_count_as_free(tmp_path: Path) -> None:
    info, need = model()
    machine(tmp_path, total_mib=8192, available_mib=need // 2)
    rig = Rig(tmp_path, memory_reserve_mb=0)
    rig.mb.worker_rss = need * MIB  # the fallback model's worker, which a reload would replace
    assert rig.mb.available() == (need // 2 + need) * MIB
    assert rig.mb.fits_now(info) and not rig.mb.fits_now(info, beside_worker=True)


def test_the_voice_reserve_is_kept_back(tmp_path: Path) -> None:
    machine(tmp_path, total_mib=4096, available_mib=1000)
    rig = Rig(tmp_path, memory_reserve_mb=96)
    assert rig.mb.available() == (1000 - 96) * MIB
    rig.mb.reserve_extra = 160 * MIB
    assert rig.mb.available() == (1000 - 96 - 160) * MIB and rig.mb.ceiling() == (4096 - 96 - 160) * MIB


def test_a_disabled_governor_lets_any_model_load_at_the_context_asked(tmp_path: Path) -> None:
    info, _ = model()
    rig = Rig(tmp_path, enabled=False, memory_budget_mb=1)
    assert rig.mb.fits_ever(info) and rig.mb.fits_now(info) and rig.mb.preflight(info, 2048) == 2048
    assert rig.rows == []


def test_preflight_picks_a_context_that_fits_and_logs_it(tmp_path: Path) -> None:
    info, need = model()
    rig = Rig(tmp_path, memory_budget_mb=need + 4)
    n_ctx = rig.mb.preflight(info, 4096)
    assert MIN_CONTEXT <= n_ctx < 4096
    assert rig.mb.estimate is not None and rig.mb.estimate.total <= (need + 4) * MIB
    assert rig.mb.budget == (need + 4) * MIB
    assert rig.decisions.actions() == ["preflight"] and "does not fit" in rig.rows[0][0]
    assert rig.rows[0][4]["n_ctx"] == n_ctx
    assert rig.mb.preflight(info, MIN_CONTEXT) == MIN_CONTEXT


def test_preflight_refuses_in_one_sentence_when_nothing_fits(tmp_path: Path) -> None:
    info, need = model()
    rig = Rig(tmp_path, memory_budget_mb=need // 2)
    with pytest.raises(UserError) as e:
        rig.mb.preflight(info, 512)
    msg = str(e.value)
    assert "needs" in msg and f"budget is {need // 2} MiB" in msg and "\n" not in msg
    assert "smaller" in (e.value.hint or "")
    assert rig.decisions.actions() == ["refuse_load"] and rig.rows[0][4] == {"n_ctx": 0}


def test_shedding_rises_at_once_and_steps_back_one_level_per_calm_spell(tmp_path: Path) -> None:
    rig = Rig(tmp_path, calm=10.0, psi_some=10.0, psi_full=5.0)
    rig.at(0, psi=(90, 50))  # severe at once: every measure, in order, and the model unloaded
    assert rig.mb.level is MemoryLevel.UNLOAD
    assert rig.decisions.actions() == ["shed_background", "shorten_requests", "unload"]
    assert len(rig.hands.unloaded) == 1 and "memory is short" in rig.hands.unloaded[0]
    assert rig.rows[0][3] == {"level": 0, "measure": "no shedding"}
    assert rig.rows[0][4] == {"level": 3, "measure": "model unloaded"}
    rig.at(1)
    rig.at(10.5)  # calm for 9.5 s: not yet
    assert rig.mb.level is MemoryLevel.UNLOAD and rig.hands.reloads == 0
    rig.at(11)
    assert rig.mb.level is MemoryLevel.SHORTEN_REQUESTS and rig.hands.reloads == 1
    rig.at(15, psi=(40, 6))  # short again at the level in force: the clock starts over
    rig.at(24)
    assert rig.mb.level is MemoryLevel.SHORTEN_REQUESTS
    rig.at(34)
    rig.at(44)
    assert rig.mb.level is MemoryLevel.CALM and rig.decisions.actions().count("memory_step_back") == 3
    assert rig.hands.reloads == 1 and rig.mb.reason == "memory is calm again"


def test_admission_follows_the_level(tmp_path: Path) -> None:
    rig = Rig(tmp_path, shrink_tokens=32)
    rig.at(0)
    assert rig.mb.admit(Req("background")) is None
    rig.at(1, psi=(15, 0))
    refusal = rig.mb.admit(Req("background"))
    assert refusal is not None and "background work is shed" in refusal and "submit it later" in refusal
    r = Req("interactive", 128)
    assert rig.mb.admit(r) is None and r.max_tokens == 128
    rig.at(2, psi=(40, 6))
    r = Req("interactive", 128)
    assert rig.mb.admit(r) is None and r.max_tokens == 32 and rig.mb.shortened == 1
    rig.at(3, psi=(80, 20))
    refusal = rig.mb.admit(Req())
    assert refusal is not None and "unloaded" in refusal and "try again" in refusal


def test_an_unloaded_model_stays_unloaded_until_there_is_room_to_load_it_again(tmp_path: Path) -> None:
    info, need = model()
    rig = Rig(tmp_path, calm=0.0, min_available_mb=50, psi_some=0.0, psi_full=0.0)
    rig.mb.estimate = estimate_memory(info, MIN_CONTEXT)
    rig.at(0, available_mib=20)  # under half the floor: unload
    assert rig.mb.level is MemoryLevel.UNLOAD
    rig.at(1, available_mib=need + 10)  # plenty now, but loading it again would leave 10 MiB: it would bounce
    rig.at(2, available_mib=need + 10)
    assert rig.mb.level is MemoryLevel.UNLOAD and rig.hands.reloads == 0
    rig.at(3, available_mib=need + 200)
    assert rig.mb.level is MemoryLevel.SHORTEN_REQUESTS and rig.hands.reloads == 1


def test_status_shows_the_worker_against_its_budget_and_the_measure(tmp_path: Path) -> None:
    info, need = model()
    rig = Rig(tmp_path, memory_budget_mb=need + 100)
    assert rig.mb.status_line() == "memory budget: engine 0 MiB of none; no shedding"
    rig.mb.preflight(info, MIN_CONTEXT)
    rig.at(0, psi=(15, 0))
    line = rig.mb.status_line()
    assert line.startswith(f"memory budget: engine 0 MiB of {need + 100} MiB, estimate ")
    assert line.endswith("; shedding background work (memory pressure some 15% full 0%)")
    assert rig.mb.status_summary() == f"engine 0/{need + 100} MiB shedding background work"
