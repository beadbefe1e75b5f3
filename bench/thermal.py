"""Thermal benchmark: what a user of a bare Raspberry Pi 5 should choose to keep it under a temperature ceiling while
it generates continuously: the stock firmware, a static thread count, the firmware's throttle with its limit lowered,
or llmos-edge's governor.

The tokens are real: one engine worker generates with the model all along, and the policies take turns on it, one
board second each in a shuffled order (this machine is shared and its speed moves by a factor of two within minutes;
taking turns slice by slice, every policy meets the same weather). In its slice a policy's limits are in force (a
thread count, and a duty cycle for pacing or for an emulated clock), and the tokens the worker produces are that
policy's. The heat is not measured here: each policy has its own simulated board (bench/thermal_sim.py), heated by a
power model of the Raspberry Pi 5 from what the policy runs, so the temperatures do not depend on this machine:

    P = P_idle + active_cores · P_core(f),      P_core(f) = P_core(2.4 GHz) · (V(f) / 0.90 V)^2 · f / 2.4 GHz

with P_idle 2.8 W, P_core(2.4 GHz) 1.125 W (a decoding core), V from 0.72 V at 1.5 GHz to 0.90 V at 2.4 GHz, on a
first-order board of R 9 K/W and tau 100 s in a 25 °C room (figures, sources and assumptions: bench/thermal_sim.py's
docstring and BENCHMARKS.md). The simulated Pi runs the appliance's four threads on its four cores; this machine has
fewer CPUs, so each engine thread here stands for PI_CORES / --threads cores of the Pi.

Policies, all with the same ceiling, CEILING_C = setpoint + MAX_OVERSHOOT_C:
  (a) no governor: the Pi's stock firmware, clock falling from 2.4 GHz at 80 °C to 1.5 GHz at 85 °C;
  (s) a static thread count, no throttle at all; the best one that stays under the ceiling over the run;
  (b) the firmware's throttle with its limit lowered (config.txt's temp_limit can be lowered, not raised): the clock
      falls in 100 MHz steps from 2.4 GHz at limit - 5 °C to 1.5 GHz at the limit; the limit is the highest whole
      degree that keeps the board under the ceiling over the run (found on the simulated boards before measuring);
  (c) the llmos governor (defaults, setpoint 75 °C): fewer threads first, then pacing.
A clock cap is emulated on the real worker as a duty cycle with every thread kept: decode at f runs at
(f / 2.4 GHz)^DECODE_EXPONENT of full speed, slowed less than in proportion because decode is memory-bound; the power
model credits the lower voltage and clock with every core active.

The run length, the rounds and the targets are fixed here, before measuring. Claims for (c): at most 1 °C above the
setpoint at any time; at least the tokens of the best (s) (median over rounds of the per-round ratio); at least
1.15x the tokens of (b). Tokens count over the whole run; the steady state (after CLIMB_S) is reported apart.
Exits 1 and prints MISSED when a target is missed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import begin
from bench.thermal_sim import BoardModel, Pi5Power, ThermalSim
from llmos_edge.config import GovernorConfig
from llmos_edge.engine import Engine, EngineSettings
from llmos_edge.governor import Actuators, Governor
from llmos_edge.sensors import Sensors
from tests.fake_sysfs import write_zone

# Fixed before measuring.
SETPOINT_C = 75.0  # the governor's default setpoint
MAX_OVERSHOOT_C = 1.0
CEILING_C = SETPOINT_C + MAX_OVERSHOOT_C  # every policy is judged against this
MIN_GAIN_VS_STATIC = 1.0
MIN_GAIN_VS_FIRMWARE = 1.15
ROUNDS = 3
DURATION_S = 600  # board seconds per policy per round
CLIMB_S = 300  # the first three time constants: the climb; the rest is the steady state
SLICE_S = 0.12  # wall seconds per policy per board second ...
SETTLE_S = 0.02  # ... of which the first part, while the new limits take hold, counts for nobody
PI_CORES = 4
DECODE_EXPONENT = 0.6  # decode speed ~ f^0.6 (see BENCHMARKS.md: half compute, half DRAM stalls at 2.4 GHz)
STOCK_LIMIT_C = 85.0  # the Pi firmware: progressive throttling from 80 °C, hard limit 85 °C
FIRMWARE_BAND_C = 5.0
FIRMWARE_STEP_GHZ = 0.1
PROMPT = "the quick brown fox"
REPO = Path(__file__).resolve().parents[1]
POWER = Pi5Power()
Decision = tuple[int, float, float, float]  # engine threads, engine duty, Pi clock (GHz), share of time computing
BOARD = BoardModel(idle_w=POWER.idle_w, load_w=POWER.core_w * POWER.cores)


MODEL_TEXT = """\
**The simulated board.** A Raspberry Pi 5 (BCM2712, 4x Cortex-A76 at 2.4 GHz), bare (no heatsink, no fan), in a
25 °C room, as a first-order thermal model (R 9 K/W, tau 100 s) heated by
P = P_idle + active cores · P_core(f), P_core(f) = P_core(2.4 GHz) · (V(f) / 0.90 V)^2 · f / 2.4 GHz
(dynamic power C·V²·f per active core; the board's and the idle cores' static power is in P_idle). It is simulated
because this machine has no Pi and no sensor that answers to our load; the engine's work is real. Public figures:

- Power: a board with the same SoC idles at 2.4 W (Compute Module 5) to 3.1 W (Pi 500) at the wall and draws 8.5 W
  (CM5) to 9 W (Pi 500) under `stress-ng --matrix 0` on all four cores, i.e. about 1.5 W per core at 2.4 GHz (Jeff
  Geerling's sbc-reviews, github.com/geerlingguy/sbc-reviews issues 58 and 60).
- Voltage: the Pi 5's PMIC reads VDD_CORE about 0.90 V under load (github.com/jfikar/RPi5-power).
- Firmware: the SoC's limit is 85 °C on all models; it can be set lower (`temp_limit`), not higher; between 80 °C and
  85 °C the Arm cores are progressively throttled, at 85 °C the Arm cores and the GPU (Raspberry Pi documentation,
  "Frequency management and thermal control" and config.txt's overclocking options, raspberrypi.com/documentation).
- Temperatures: a bare Pi 5 idles around 50 °C (beamostore.com, "Raspberry Pi 5 overheating"); without a heatsink its
  SoC averaged 81 °C with a peak of 89 °C through Phoronix's benchmark suite, while the active cooler kept it at
  2.4 GHz throughout (phoronix.com, "Raspberry Pi 5 Benchmarks", page 2).
- Decode is memory-bound on the Pi 5: its LPDDR4X sustains about 11.4 GB/s of a 17 GB/s ceiling per board
  (hellomatik.com, "Pushing four Raspberry Pis to the limit").

Assumed: P_idle 2.8 W (within the 2.4-3.1 W above); a decoding core draws 3/4 of a stress-ng core, 1.125 W, since it
waits on DRAM much of the time; R 9 K/W, which puts the idle board at 50 °C; tau 100 s, a climb to 80 °C in a little
over two minutes at full load; V falling linearly with the clock to 0.72 V at 1.5 GHz; the firmware's progressive
throttle as a straight line from 2.4 GHz at limit - 5 °C to 1.5 GHz at the limit, in 100 MHz steps, polled every
second (the Pi 5's curve is not published). A clock cap slows decode by (f / 2.4 GHz)^0.6, not in proportion: if half
of a token's time at 2.4 GHz is DRAM stalls, which the core clock does not shorten, speed(f) = 1 / (0.5 + 0.5 · 2.4 /
f), and f^0.6 follows that within 2% from 1.0 to 2.4 GHz. The stock firmware's steady 81 °C in this model matches
Phoronix's 81 °C average above.

**Caveat.** This machine is a shared virtual machine with 2 CPUs: the second engine thread competes with the other
tenants' work, so two threads give far less than twice one thread's speed here (see the unthrottled speeds above,
taken under the load average shown), more so than four threads on a Pi's four dedicated cores. That exaggerates the
thread effect: what the governor gains by running fewer threads, and what (b) loses by keeping them all. On a
dedicated Pi, (c) would stand lower against (b) than it does here.
"""


class FirmwareThrottle:
    """The Raspberry Pi firmware's thermal throttle, as its documentation describes it: between `limit` - 5 °C and
    `limit` the arm clock is progressively lowered (here linearly, in 100 MHz steps, from 2.4 to 1.5 GHz), and at the
    limit it is at its floor. The Pi 5's exact curve is not published; this is an assumption in its spirit."""

    def __init__(self, limit: float, power: Pi5Power = POWER) -> None:
        self.limit = limit
        self.power = power

    def ghz(self, celsius: float) -> float:
        p = self.power
        x = min(1.0, max(0.0, (celsius - (self.limit - FIRMWARE_BAND_C)) / FIRMWARE_BAND_C))
        f = p.f_max_ghz - x * (p.f_max_ghz - p.f_min_ghz)
        steps = int((f - p.f_min_ghz) / FIRMWARE_STEP_GHZ + 1e-9)  # the step at or below f
        return round(p.f_min_ghz + steps * FIRMWARE_STEP_GHZ, 3)


def clock_duty(ghz: float) -> float:
    """The duty cycle that emulates a clock cap on this machine: decode's speed at `ghz` relative to 2.4 GHz."""
    return float((ghz / POWER.f_max_ghz) ** DECODE_EXPONENT)


@dataclass
class Run:
    policy: str
    name: str
    t: list[float] = field(default_factory=list)  # board seconds
    temp: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # per board second
    watts: list[float] = field(default_factory=list)
    ghz: list[float] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)  # active Pi cores (threads x cores per thread x duty)
    threads: list[int] = field(default_factory=list)  # the worker's limits here
    duty: list[float] = field(default_factory=list)

    def total(self, since: float = 0.0) -> int:
        return sum(n for t, n in zip(self.t, self.tokens, strict=True) if t > since)

    def peak(self, since: float = 0.0) -> float:
        return max(x for t, x in zip(self.t, self.temp, strict=True) if t > since)

    def mean(self, values: list[float], since: float) -> float:
        return statistics.fmean(x for t, x in zip(self.t, values, strict=True) if t > since)

    def time_above(self, celsius: float) -> float:
        return float(sum(1 for x in self.temp if x > celsius))


class Sink:
    def event(self, kind: str, message: str, data: dict[str, object] | None = None) -> None:
        pass


class Workload:
    """Generates continuously on the engine in a thread; the engine counts the tokens (streamed text is coalesced)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def tokens(self) -> int:
        return self.engine.tokens_total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.engine.generate(PROMPT, 200, lambda _text: None, self._stop.is_set)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@dataclass
class Policy:
    """A policy's board and how it decides: `decide(celsius, board_time)` returns (threads, duty, ghz, busy) for the
    next board second: the worker's limits here, and the Pi's clock and the share of the time its cores compute (a
    clock cap, emulated by a duty cycle, keeps them busy; pacing rests them)."""

    key: str
    name: str
    decide: Callable[[float, float], Decision]
    sim: ThermalSim = field(default_factory=lambda: ThermalSim(BOARD))
    root: Path | None = None


def firmware(limit: float, threads: int) -> Callable[[float, float], Decision]:
    fw = FirmwareThrottle(limit)

    def decide(celsius: float, _now: float) -> Decision:
        ghz = fw.ghz(celsius)
        return threads, clock_duty(ghz), ghz, 1.0

    return decide


def firmware_limit(threads: int) -> int:
    """The highest whole-degree limit (config.txt's temp_limit is whole degrees) at which the firmware's throttle keeps
    the board under the ceiling over the run: the firmware setting a user would pick. Found on the boards alone."""
    for limit in range(int(STOCK_LIMIT_C), 0, -1):
        sim, decide, peak = ThermalSim(BOARD), firmware(limit, threads), 0.0
        for second in range(DURATION_S):
            _n, _duty, ghz, busy = decide(sim.celsius, float(second))
            peak = max(peak, sim.step_watts(POWER.watts(PI_CORES * busy, ghz), 1.0))
        if peak <= CEILING_C:
            return limit
    raise SystemExit("no firmware limit keeps the simulated board under the ceiling")


def static(threads: int) -> Callable[[float, float], Decision]:
    def decide(_celsius: float, _now: float) -> Decision:
        return threads, 1.0, POWER.f_max_ghz, 1.0

    return decide


def make_policies(threads: int, tmp: Path) -> list[Policy]:
    cpt = PI_CORES / threads
    policies: list[Policy] = []

    policies.append(Policy("stock", "(a) no governor (stock firmware, 80-85 °C)", firmware(STOCK_LIMIT_C, threads)))
    for n in range(1, threads + 1):
        cores = n * cpt
        policies.append(
            Policy(
                f"static{n}",
                f"(s) {n} thread{'s' if n > 1 else ''} ({cores:g} Pi cores), no throttle",
                static(n),
            )
        )
    limit = firmware_limit(threads)
    policies.append(
        Policy(
            "firmware",
            f"(b) firmware throttle, limit lowered to {limit} °C ({limit - FIRMWARE_BAND_C:g}-{limit} °C)",
            firmware(limit, threads),
        )
    )

    root = tmp / "governor"
    write_zone(root, BOARD.steady_state(0.0))
    limits = {"threads": threads, "duty": 1.0}

    def set_limits(n: int, duty: float) -> None:
        limits["threads"], limits["duty"] = n, duty

    cfg = replace(GovernorConfig(), sensors_root=str(root), setpoint=SETPOINT_C, min_available_mb=0)
    gov = Governor(
        cfg, Sink(), Actuators(set_limits=set_limits), max_threads=threads, sensors=Sensors(root, vcgencmd=None)
    )

    def governor(celsius: float, now: float) -> Decision:
        write_zone(root, celsius)
        gov.tick(now)
        return int(limits["threads"]), float(limits["duty"]), POWER.f_max_ghz, float(limits["duty"])

    policies.append(Policy("governor", "(c) llmos governor", governor, root=root))
    return policies


def run_round(engine: Engine | None, threads: int, seed: int) -> dict[str, Run]:
    """One run of every policy, from a board at its idle temperature, taking turns one board second at a time.
    Without an engine only the boards run (no tokens): the temperatures do not depend on the engine."""
    cpt = PI_CORES / threads
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        policies = make_policies(threads, Path(tmp))
        runs = {p.key: Run(p.key, p.name) for p in policies}
        work = Workload(engine) if engine is not None else None
        if work is not None:
            work.start()
        try:
            for second in range(DURATION_S):
                order = list(policies)
                rng.shuffle(order)  # no policy always follows the same one (token messages arrive up to 20 ms late)
                for p in order:
                    n, duty, ghz, busy = p.decide(p.sim.celsius, float(second))
                    tokens = 0
                    if engine is not None and work is not None:
                        engine.set_limits(threads=n, duty=duty)
                        time.sleep(SETTLE_S)
                        before = work.tokens
                        time.sleep(SLICE_S - SETTLE_S)
                        tokens = work.tokens - before
                    active = n * cpt * busy
                    watts = POWER.watts(active, ghz)
                    celsius = p.sim.step_watts(watts, 1.0)
                    r = runs[p.key]
                    r.t.append(float(second + 1))
                    r.temp.append(celsius)
                    r.tokens.append(tokens)
                    r.watts.append(watts)
                    r.ghz.append(ghz)
                    r.cores.append(active)
                    r.threads.append(n)
                    r.duty.append(duty)
        finally:
            if work is not None:
                work.stop()
            if engine is not None:
                engine.set_limits(threads=threads, duty=1.0)
    return runs


def unthrottled(engine: Engine, threads: int, seconds: float = 6.0) -> dict[int, float]:
    """tok/s per thread count with no limit: the thread effect on this machine."""
    w = Workload(engine)
    w.start()
    out = {}
    try:
        for n in range(threads, 0, -1):
            engine.set_limits(threads=n, duty=1.0)
            time.sleep(0.5)
            t0, k0 = time.monotonic(), w.tokens
            time.sleep(seconds)
            out[n] = (w.tokens - k0) / (time.monotonic() - t0)
    finally:
        w.stop()
        engine.set_limits(threads=threads, duty=1.0)
    return out


def plot(runs: dict[str, Run], names: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 8.5), sharex=True)
    for key, run in runs.items():
        ax1.plot(run.t, run.temp, label=names[key])
        window = 20
        rate = [
            sum(run.tokens[i - window : i]) / (window * (SLICE_S - SETTLE_S)) if i >= window else float("nan")
            for i in range(len(run.t))
        ]
        ax2.plot(run.t, rate, label=names[key])
        ax3.plot(run.t, run.watts, label=names[key])
    ax1.axhline(CEILING_C, color="gray", linestyle="--", linewidth=0.8)
    ax1.axvline(CLIMB_S, color="gray", linestyle=":", linewidth=0.8)
    ax1.set_ylabel("board temperature (°C)")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.set_ylabel("tok/s on this machine\n(20 s mean)")
    ax3.set_ylabel("simulated board power (W)")
    ax3.set_xlabel("board time (s); dotted: end of the climb")
    fig.suptitle("Simulated bare Raspberry Pi 5 (power model), real generation")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def choose_text(results: dict[str, list[Run]], best: str | None, limit_name: str, threads: int, measured: float) -> str:
    """What a user should choose, in words, from the figures (written by the script, so it never goes stale)."""

    def med(a: str, b: str) -> float:
        return statistics.median(x.total() / max(1, y.total()) for x, y in zip(results[a], results[b], strict=True))

    gov = results["governor"]
    overshoot = max(x.peak() for x in gov) - SETPOINT_C
    stock_peak = results["stock"][0].peak()
    vs_fw, vs_stock = med("governor", "firmware"), med("governor", "stock")
    fw_ghz = results["firmware"][0].mean(results["firmware"][0].ghz, CLIMB_S)
    gov_cores = gov[0].mean(gov[0].cores, CLIMB_S)
    held = "holds" if overshoot <= MAX_OVERSHOOT_C else "does not hold"
    text = (
        f"**What to choose.** (a), doing nothing, peaks at {stock_peak:.1f} °C: the stock firmware breaks a "
        f"{CEILING_C:g} °C ceiling (and (c) gets {vs_stock:.2f}x its tokens for keeping under it). The governor {held} "
        f"its setpoint ({overshoot:+.2f} °C at worst). "
    )
    if best is None:
        text += f"No static thread count stays under {CEILING_C:g} °C. "
    else:
        vs_static = med("governor", best)
        text += (
            f"Against the best static thread count that stays under the ceiling, {results[best][0].name}, it gives "
            f"{vs_static:.2f}x the tokens"
        )
        if vs_static >= MIN_GAIN_VS_STATIC:
            text += (
                " (met): it runs more threads whenever the heat allows, where a static count must be chosen for the "
                "worst case. "
            )
        else:
            text += (
                f" (**MISSED**): on this machine {threads} threads ran {measured:.2f}x as fast as one, so the time the "
                "governor spends on more threads, which the heat allows, buys no more tokens (projection below). "
            )
    if vs_fw >= MIN_GAIN_VS_FIRMWARE:
        text += (
            f"Against {limit_name}, it gives {vs_fw:.2f}x the tokens, meeting its {MIN_GAIN_VS_FIRMWARE:g}x claim "
            f"on this machine, where {threads} threads ran {measured:.2f}x as fast as one. That is the machine, not "
            f"the Pi: the claim holds only where {threads} threads are at most {breakeven(results, threads):.2f}x as "
            "fast as one (projection below), and a Pi's dedicated cores scale better than this shared machine's."
        )
    else:
        text += (
            f"**It does not meet its claim against the firmware throttle:** against {limit_name} it gives "
            f"{vs_fw:.2f}x the tokens, not {MIN_GAIN_VS_FIRMWARE:g}x. In this model a lower clock, with its lower "
            "voltage, saves more watts per token lost than fewer threads or pacing at full clock do: in the steady "
            f"state the firmware keeps all {PI_CORES} cores decoding at {fw_ghz:.2f} GHz on average, where the "
            f"governor keeps {gov_cores:.2f} cores busy at {POWER.f_max_ghz:g} GHz. "
            "So for the most tokens under a ceiling, a user should lower the firmware's `temp_limit` "
            "(above) and, if they want the governor's other duties (critical stop, admission, the memory budget), "
            "raise the governor's setpoint above that limit; the governor would need the clock (cpufreq's "
            "`scaling_max_freq`) as its first actuator to beat it."
        )
    return text


def projected(run: Run, scaling: float, threads: int, since: float = CLIMB_S) -> float:
    """Tokens a run's limits would give (in units of one thread's speed-seconds) on a machine where `threads` threads
    run `scaling` times as fast as one (linear in between). The limits depend only on the simulated temperatures, so
    this needs no machine: it shows how the verdicts hang on the thread effect, which this machine distorts."""

    def speed(n: int) -> float:
        return 1.0 + (scaling - 1.0) * (n - 1) / (threads - 1) if threads > 1 else 1.0

    return sum(speed(n) * d for t, n, d in zip(run.t, run.threads, run.duty, strict=True) if t > since)


def breakeven(results: dict[str, list[Run]], threads: int) -> float:
    """The thread effect (speed of `threads` threads over one) up to which (c) keeps its gain over (b)."""
    gov, fw = results["governor"][0], results["firmware"][0]
    lo, hi = 0.5, float(threads)
    for _ in range(50):  # (c)/(b) falls as the threads (b) keeps get faster
        mid = (lo + hi) / 2
        ok = projected(gov, mid, threads) / projected(fw, mid, threads) >= MIN_GAIN_VS_FIRMWARE
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo


def projection_text(results: dict[str, list[Run]], under: list[str], threads: int, measured: float) -> str:
    if threads < 2:
        return ""
    gov, fw = results["governor"][0], results["firmware"][0]

    def vs_fw(x: float) -> float:
        return projected(gov, x, threads) / projected(fw, x, threads)

    def vs_static(x: float) -> float:
        return projected(gov, x, threads) / max(projected(results[k][0], x, threads) for k in under)

    lo = breakeven(results, threads)
    rows = [
        f"| {threads} threads run ... one thread's speed | (c) / (b) | (c) / best static |",
        "|---|---|---|",
    ]
    for x in sorted({1.0, 1.25, 1.5, 1.75, 2.0, round(measured, 2)}):
        static = f"{vs_static(x):.2f}x" if under else "none under the ceiling"
        mark = " (this run)" if x == round(measured, 2) else ""
        rows.append(f"| {x:g}x{mark} | {vs_fw(x):.2f}x | {static} |")
    return (
        "**How the verdicts hang on the thread effect** (a projection from the simulated boards' limits, not a "
        f"measurement): the steady state's tokens if {threads} threads ran so many times as fast as one. This run "
        f"measured {measured:.2f}x (its unthrottled static policies, median over the rounds). "
        f"(c) reaches {MIN_GAIN_VS_FIRMWARE:g}x (b) only where {threads} "
        f"threads are at most {lo:.2f}x as fast as one.\n\n" + "\n".join(rows) + "\n"
    )


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF to generate with (not needed with --boards-only)")
    ap.add_argument("--threads", type=int, default=2, help="the most engine threads (this machine's CPUs)")
    ap.add_argument("--boards-only", action="store_true", help="only the simulated boards, no generation")
    ap.add_argument("--write", action="store_true", help="write results and plot into BENCHMARKS.md")
    args = ap.parse_args()
    report = begin()
    started = time.monotonic()

    if args.boards_only:
        for key, r in run_round(None, args.threads, 0).items():
            print(
                f"{key:9s} peak {r.peak():6.2f} °C, steady mean {r.mean(r.temp, CLIMB_S):6.2f} °C, "
                f"{r.mean(r.watts, CLIMB_S):.2f} W, {r.mean(r.ghz, CLIMB_S):.2f} GHz, {r.mean(r.cores, CLIMB_S):.2f} "
                "cores"
            )
        return 0
    if args.model is None:
        ap.error("give --model (or --boards-only)")

    engine = Engine(EngineSettings(model_path=str(args.model), n_ctx=512, n_threads=args.threads), load_timeout=300)
    engine.start()
    results: dict[str, list[Run]] = {}
    try:
        speeds = unthrottled(engine, args.threads)
        for n, rate in sorted(speeds.items()):
            print(f"{n} thread(s) unthrottled: {rate:.0f} tok/s", flush=True)
        for rnd in range(ROUNDS):
            for key, run in run_round(engine, args.threads, rnd).items():
                results.setdefault(key, []).append(run)
                print(
                    f"round {rnd + 1} {key:9s}: peak {run.peak():6.2f} °C, {run.total()} tokens "
                    f"({run.total(CLIMB_S)} in the steady state)",
                    flush=True,
                )
    finally:
        engine.stop()
    minutes = (time.monotonic() - started) / 60

    names = {k: v[0].name for k, v in results.items()}
    gov = results["governor"]
    fw = results["firmware"]
    statics = [k for k in results if k.startswith("static")]
    under = [k for k in statics if max(x.peak() for x in results[k]) <= CEILING_C]
    best = max(under, key=lambda k: statistics.median(x.total() for x in results[k])) if under else None

    def ratios(a: list[Run], b: list[Run], since: float = 0.0) -> list[float]:
        return [x.total(since) / max(1, y.total(since)) for x, y in zip(a, b, strict=True)]

    overshoot = max(x.peak() for x in gov) - SETPOINT_C
    vs_fw = ratios(gov, fw)
    report.verdict(
        "thermal governor overshoot above its setpoint (any round, any time)",
        f"{overshoot:+.2f} °C",
        f"<= {MAX_OVERSHOOT_C:g} °C",
        overshoot <= MAX_OVERSHOOT_C,
    )
    if best is None:
        report.verdict(
            "thermal governor / best static thread count under the ceiling, tokens",
            f"no static thread count stays under {CEILING_C:g} °C",
            f">= {MIN_GAIN_VS_STATIC:g}x",
            True,
        )
        vs_static: list[float] = []
    else:
        vs_static = ratios(gov, results[best])
        report.verdict(
            f"thermal governor / best static thread count under the ceiling ({best[6:]} engine threads), tokens",
            f"{statistics.median(vs_static):.2f}x (median of {ROUNDS}; {', '.join(f'{x:.2f}' for x in vs_static)})",
            f">= {MIN_GAIN_VS_STATIC:g}x",
            statistics.median(vs_static) >= MIN_GAIN_VS_STATIC,
        )
    report.verdict(
        "thermal governor / firmware throttle at the same ceiling, tokens",
        f"{statistics.median(vs_fw):.2f}x (median of {ROUNDS}; {', '.join(f'{x:.2f}' for x in vs_fw)})",
        f">= {MIN_GAIN_VS_FIRMWARE:g}x",
        statistics.median(vs_fw) >= MIN_GAIN_VS_FIRMWARE,
    )
    print(f"bench-thermal took {minutes:.1f} min")

    # The thread effect as this run met it: the unthrottled static policies take turns in the same weather.
    top = f"static{args.threads}"
    scaling = statistics.median(ratios(results[top], results["static1"])) if args.threads > 1 else 1.0
    print(f"{args.threads} threads / 1 thread, unthrottled, in the run: {scaling:.2f}x")
    if args.write:
        png = REPO / "bench" / "thermal.png"
        plot({k: v[-1] for k, v in results.items()}, names, png)
        rows = [
            "| policy | peak °C | steady-state mean °C | steady W | steady clock, active Pi cores | tokens, whole "
            "run | tokens, steady state | (c) / this, whole run | (c) / this, steady |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, per_round in results.items():
            r0 = per_round[0]  # the boards are deterministic: every round has the same temperatures
            mark = " (over the ceiling)" if r0.peak() > CEILING_C else ""
            rows.append(
                f"| {names[key]}{' **best static**' if key == best else ''} | {r0.peak():.2f}{mark} | "
                f"{r0.mean(r0.temp, CLIMB_S):.2f} | {r0.mean(r0.watts, CLIMB_S):.2f} | "
                f"{r0.mean(r0.ghz, CLIMB_S):.2f} GHz, {r0.mean(r0.cores, CLIMB_S):.2f} | "
                f"{spread([float(x.total()) for x in per_round], '.0f')} | "
                f"{spread([float(x.total(CLIMB_S)) for x in per_round], '.0f')} | "
                f"{spread(ratios(gov, per_round), '.2f')}x | {spread(ratios(gov, per_round, CLIMB_S), '.2f')}x |"
            )
        speeds_text = "; ".join(f"{n} thread{'s' if n > 1 else ''} {rate:.0f} tok/s" for n, rate in speeds.items())
        body = (
            f"Model `{args.model.name}`, context 512, continuous greedy generation on one engine worker with up to "
            f"{args.threads} threads; each engine thread stands for {PI_CORES / args.threads:g} cores of the "
            f"simulated Pi. {ROUNDS} rounds of {DURATION_S} board seconds per policy (the first {CLIMB_S} s are the "
            f"climb, the rest the steady state), {SLICE_S * 1000:.0f} ms of wall time per policy per board second "
            f"({(SLICE_S - SETTLE_S) * 1000:.0f} ms counted). Ceiling {CEILING_C:g} °C = the governor's setpoint "
            f"{SETPOINT_C:g} °C + {MAX_OVERSHOOT_C:g} °C. Temperatures come from the power model and are the same "
            "every round; tokens are medians with the range over the rounds in brackets. Unthrottled speed on this "
            f"machine at the start: {speeds_text}. The run took {minutes:.1f} min.\n\n" + "\n".join(rows) + "\n"
        )
        body += "\n" + choose_text(results, best, names["firmware"], args.threads, scaling) + "\n\n"
        body += projection_text(results, under, args.threads, scaling) + "\n" + MODEL_TEXT
        body += "\n![temperature, speed and board power over board time, last round](bench/thermal.png)\n"
        report.write_section(
            "thermal",
            "Thermal: stock firmware, static threads, firmware throttle and llmos governor on a simulated Pi 5",
            f"make bench-thermal (python bench/thermal.py --model {args.model.name} --threads {args.threads} --write)",
            body,
        )
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
