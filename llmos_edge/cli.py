"""The `llmos` command. Each subcommand is a thin layer over one documented function of the package."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from llmos_edge import __version__, factory_reset
from llmos_edge.config import LoadedConfig, dump, last_good_path, load_file, load_layers, reference
from llmos_edge.errors import UserError

DEFAULT_CONFIG = "/etc/llmos/llmos.yaml"

EPILOG = """\
examples:
  llmos run --config examples/dev.yaml --console stdio   talk to it on this terminal
  llmos check-config /etc/llmos/llmos.yaml                validate a config file
  llmos logs -n 20                                       the last 20 requests
  llmos submit "reverse stone"                           a background request to the running supervisor
  llmos teach 'what is the wifi password => on the sticker'   teach an answer (llmos forget QUESTION undoes it)
  llmos consolidate                                          put the taught answers into the model's weights
"""


# EX_CONFIG: llmos.service's RestartPreventExitStatus= names it, so systemd does not restart a supervisor that can
# never start (a database it cannot open); the journal has the reason.
EXIT_CANNOT_WORK = 78


def _die(e: UserError) -> int:
    print(f"llmos: error: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"llmos: hint: {e.hint}", file=sys.stderr)
    return 2


def _with_overrides(loaded: LoadedConfig, args: argparse.Namespace) -> LoadedConfig:
    """Command-line options win over every config file."""
    cfg = loaded.config
    if getattr(args, "console", None):
        cfg = dataclasses.replace(cfg, console=dataclasses.replace(cfg.console, device=args.console))
    if getattr(args, "model", None):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=args.model))
    if getattr(args, "db", None):
        cfg = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, path=args.db))
    return dataclasses.replace(loaded, config=cfg)


def _run_config(args: argparse.Namespace) -> LoadedConfig:
    """The configuration `llmos run` runs with these arguments."""
    # The last configuration that ran lives beside the database; which database is itself a setting.
    db = args.db or load_layers(args.config, args.override).config.database.path
    return _with_overrides(load_layers(args.config, args.override, last_good=last_good_path(db)), args)


def cmd_run(args: argparse.Namespace) -> int:
    loaded = _run_config(args)
    log_file = None
    if loaded.config.console.device == "stdio" and sys.stderr.isatty():
        # The console owns this terminal: log lines in the middle of an answer would garble it.
        log_file = Path(loaded.config.database.path).with_suffix(".log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        print(f"llmos: logging to {log_file}; Ctrl-D at an empty prompt quits", file=sys.stderr)
        # llama.cpp writes to file descriptor 2 from native code, in this process and the engine worker it starts:
        # point the descriptor itself at the log, not just Python's logging.
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    # journald adds its own timestamps; a terminal or a file still wants them
    timestamps = log_file is not None or sys.stderr.isatty()
    handler.setFormatter(
        logging.Formatter(("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    if loaded.fallback:
        print(f"llmos: error: {loaded.fallback}", file=sys.stderr)
        print(
            "llmos: hint: fix the file and restart (`llmos check-config FILE` validates); meanwhile it runs as "
            "the error says",
            file=sys.stderr,
        )
    from llmos_edge import engine

    engine.prestart_worker()  # the engine's imports run beside the supervisor's (boot time: docs/image.md)
    from llmos_edge.supervisor import Supervisor  # heavy imports only for the command that needs them

    try:
        supervisor = Supervisor(loaded)
    except UserError as e:
        engine.discard_prestarted()
        _die(e)
        if e.passing:  # a lock another process holds: systemd's restart tries again
            logging.getLogger("llmos").error("cannot start for now: %s", e)
            return 1
        logging.getLogger("llmos").error("cannot start, and a restart would not help: %s", e)
        return EXIT_CANNOT_WORK
    try:
        return supervisor.run()
    except UserError as e:
        return _die(e)


def cmd_net_setup(args: argparse.Namespace) -> int:
    from llmos_edge import netpolicy

    loaded = _run_config(args)
    try:
        print(netpolicy.apply(loaded.config, Path(args.dir), reload=not args.no_reload))
    except (OSError, subprocess.CalledProcessError) as e:
        return _die(UserError(f"cannot write the network drop-in in {args.dir}: {e}", "run it as root (systemd does)"))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    status = 0
    cfg = None
    for path in args.files:
        try:
            cfg = load_file(path, cfg)
            print(f"{path}: ok")
        except UserError as e:
            status = _die(e)
    if args.print and cfg is not None and status == 0:
        print(dump(cfg), end="")
    return status


def cmd_logs(args: argparse.Namespace) -> int:
    from llmos_edge.store import open_readonly, uncommitted
    from llmos_edge.supervisor import format_request

    db_path = args.db or _with_overrides(load_layers(args.config), args).config.database.path
    db = open_readonly(db_path)
    table = "events" if args.events else "requests"
    if not db[table].exists():
        raise UserError(f"{db_path} holds no {table} table", "is this an llmos-edge database?")
    rows = list(db[table].rows_where(order_by="id desc", limit=args.n))[::-1]
    if table == "requests":  # with database.request_flush, the newest rows may still be in the request ring only
        rows = (rows + uncommitted(db, db_path, table))[-args.n :] if args.n else rows
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    elif args.events:
        import time

        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
            print(f"#{r['id']} {when} {r['kind']}: {r['message']}")
    else:
        for r in rows:
            print(format_request(r))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from llmos_edge.models import describe, read_gguf

    print(json.dumps(describe(read_gguf(args.path)), indent=2, allow_nan=False))
    return 0


def _socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    return _with_overrides(load_layers(args.config), args).config.scheduler.control_socket


def cmd_submit(args: argparse.Namespace) -> int:
    from llmos_edge.control import call

    msg: dict[str, object] = {"op": "submit", "id": 1, "prompt": args.prompt, "priority": args.priority}
    if args.max_tokens:
        msg["max_tokens"] = args.max_tokens
    done: dict[str, object] = {}
    for event in call(_socket(args), msg):
        if event["event"] == "accepted" and args.no_wait:
            print(f"accepted as request {event['request']}")
            return 0  # closing the connection leaves the request running
        if event["event"] == "token":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif event["event"] == "done":
            done = event
    print()
    if args.json:
        print(json.dumps(done), file=sys.stderr)
    if done.get("outcome") != "ok":
        print(f"llmos: {done.get('outcome')}: {done.get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from llmos_edge.control import call

    words = [args.action, *([str(Path(args.arg).resolve())] if args.action == "install" and args.arg else [])]
    if args.action != "install" and args.arg:
        words.append(args.arg)
    for event in call(_socket(args), {"op": "model", "args": " ".join(words)}):
        if event["event"] == "progress":
            print(f"[{event['text']}]", file=sys.stderr)
        elif event["event"] == "model":
            lines = event["lines"]
            print("\n".join(lines))
            return 1 if any(" failed its gate " in line for line in lines) else 0
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from llmos_edge.control import call

    words = "consolidate status" if args.status else "consolidate"
    for event in call(_socket(args), {"op": "model", "args": words}, timeout=10):
        if event["event"] == "model":
            print("\n".join(event["lines"]))
    return 0


def cmd_teach(args: argparse.Namespace) -> int:
    from llmos_edge.control import call
    from llmos_edge.learning import parse_teach

    if args.list is not None:
        for event in call(_socket(args), {"op": "taught", "search": args.list}, timeout=10):
            pairs = event["pairs"]
            for p in pairs:
                print(f"#{p['pair']} {p['question']!r} => {p['answer']!r} (taught on {p['source']})")
            if not pairs:
                print("(nothing taught)" if not args.list else f"(no taught pair matches {args.list!r})")
        return 0
    if not args.pair:
        raise UserError(
            "teach needs QUESTION => ANSWER (or --list)", "llmos teach 'what is the wifi password => on the sticker'"
        )
    question, answer = parse_teach(" ".join(args.pair))
    for event in call(_socket(args), {"op": "teach", "question": question, "answer": answer}, timeout=10):
        again = "; it replaces the earlier answer" if event["replaced"] else ""
        print(f"taught #{event['pair']}: {event['question']!r} => {event['answer']!r}{again}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from llmos_edge.control import call

    if (args.memory is None) == (not args.question):
        raise UserError("forget needs a taught question, or --memory SOURCE", "llmos forget what is the wifi password")
    msg: dict[str, object] = {"op": "forget"}
    if args.memory is not None:
        msg["memory"] = args.memory
    else:
        msg["question"] = " ".join(args.question)
    for event in call(_socket(args), msg, timeout=10):
        if "memory" in event:
            print(f"forgot {event['turns']} turns of {event['memory']}")
        else:
            print(f"forgot #{event['pair']}: {event['question']!r} => {event['answer']!r}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from llmos_edge.control import call

    for event in call(_socket(args), {"op": "status"}, timeout=10):
        if args.json:
            print(json.dumps(event["status"], indent=2))
        else:
            print("\n".join(event["lines"]))
    return 0


def cmd_factory_reset(args: argparse.Namespace) -> int:
    """Ask for a factory reset (typed confirmation unless --yes), or, with --arm, arm one (the root unit's step)."""
    db = args.db or load_layers(args.config).config.database.path
    if args.arm:
        print(factory_reset.arm(db, Path(args.efivars)))
        return 0
    if not args.yes:
        print(factory_reset.WARNING)
        try:
            typed = input("> ").strip()
        except EOFError:
            typed = ""
        if typed != factory_reset.CONFIRMATION:
            print(f"factory reset cancelled (it needs {factory_reset.CONFIRMATION} typed exactly)")
            return 1
    path = factory_reset.request(db, "cli")
    print(f"factory reset requested ({path}): the device restarts and erases /var as it boots")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """The boot's health gate (llmos-health.service): exit 0 once the supervisor is ready without a restart."""
    from llmos_edge import health

    v = health.wait(_socket(args), args.wait, unit=args.unit)
    print(f"llmos health: {'good' if v.healthy else 'bad'}: {v.reason}", file=sys.stdout if v.healthy else sys.stderr)
    return 0 if v.healthy else 1


def cmd_update(args: argparse.Namespace) -> int:
    """Verify a bundle, install it with systemd-sysupdate, wait until idle (root; llmos-update.service)."""
    from llmos_edge import health, update

    where = update.take_request(Path(args.request)) if args.request else Path(args.path or "")
    if not args.request and not args.path:
        raise UserError("update needs a bundle directory (or --request FILE)", "llmos update /media/UPDATE/0.2.0")
    print(f"llmos update: verifying the bundle in {where}", flush=True)
    bundle = update.stage(where, Path(args.staging), Path(args.keyring))
    print(f"llmos update: version {bundle.version} verified ({', '.join(sorted(bundle.files))})", flush=True)
    if args.no_install:
        return 0
    print(update.install(), flush=True)
    print(f"llmos update: version {bundle.version} installed in the other slot", flush=True)
    shutil.rmtree(Path(args.staging) / "verified", ignore_errors=True)  # written to the slot: the copy can go
    if not update.wait_idle(lambda: health.supervisor_status(_socket(args)), args.wait_idle):
        print(f"llmos update: still busy after {args.wait_idle:.0f} s; restarting anyway", flush=True)
    print(f"llmos update: restarting into version {bundle.version}", flush=True)
    return 0


def cmd_config_reference(_args: argparse.Namespace) -> int:
    print(reference(), end="")
    return 0


def socket_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every command that talks to the running supervisor over its control socket."""
    p.add_argument("--socket", metavar="PATH", help="control socket (default: scheduler.control_socket)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="config to find the socket in")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmos",
        description="llmos-edge: an LLM operating system for edge hardware.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"llmos-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the supervisor (engine, scheduler, console)")
    r.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="config file; repeat to layer files, later ones win (default: built-in defaults)",
    )
    r.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FILE",
        help="optional config file applied last, skipped if missing (the device's writable override)",
    )
    r.add_argument(
        "--console",
        metavar="DEVICE",
        help="console device: /dev/ttyS0, kernel (the kernel's console UART), a pty path, socket://host:port, "
        "stdio (this terminal), none",
    )
    r.add_argument("--model", metavar="PATH", help="GGUF model file (overrides model.path)")
    r.add_argument("--db", metavar="PATH", help="SQLite database (overrides database.path)")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    r.set_defaults(func=cmd_run)

    ns = sub.add_parser(
        "net-setup",
        help="open the service's network sandbox for HTTP, or close it, as the configuration says (run by "
        "llmos-net.service before each start)",
    )
    ns.add_argument("--config", action="append", default=[], metavar="FILE", help="as for run")
    ns.add_argument("--override", action="append", default=[], metavar="FILE", help="as for run")
    ns.add_argument("--db", metavar="PATH", help="as for run (where the last good configuration is)")
    ns.add_argument("--dir", default="/run/systemd/system/llmos.service.d", help="where the drop-in goes")
    ns.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    ns.set_defaults(func=cmd_net_setup)

    c = sub.add_parser("check-config", help="validate config files (layered in the order given)")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--print", action="store_true", help="print the resulting configuration")
    c.set_defaults(func=cmd_check_config)

    lg = sub.add_parser("logs", help="print recent requests (or events) from the database")
    lg.add_argument("-n", type=int, default=10, metavar="N", help="how many rows (default 10)")
    lg.add_argument("--json", action="store_true", help="one JSON object per line")
    lg.add_argument("--events", action="store_true", help="events (ready, restarts, errors) instead of requests")
    lg.add_argument("--db", metavar="PATH", help="database file (default: database.path of the config)")
    lg.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help=f"config file to find the database in (e.g. {DEFAULT_CONFIG})",
    )
    lg.set_defaults(func=cmd_logs)

    md = sub.add_parser(
        "model",
        help="the model store of the running supervisor: list, install PATH, activate NAME, rollback, remove NAME",
        description="Install a GGUF model (checked, copied to the store, gated on the real engine, then active; "
        "rolled back by itself if it fails), list, activate, roll back or remove models.",
    )
    md.add_argument("action", choices=["list", "install", "activate", "rollback", "remove"])
    md.add_argument("arg", nargs="?", default="", metavar="PATH|NAME", help="a .gguf file (or a directory holding one)")
    socket_arguments(md)
    md.set_defaults(func=cmd_model)

    m = sub.add_parser("model-info", help="a GGUF file's header as JSON, with a memory estimate")
    m.add_argument("path", metavar="MODEL.gguf")
    m.set_defaults(func=cmd_model_info)

    sm = sub.add_parser("submit", help="send a request to the running supervisor (background priority by default)")
    sm.add_argument("prompt", metavar="PROMPT")
    sm.add_argument("--priority", choices=["background", "interactive"], default="background")
    sm.add_argument("--max-tokens", type=int, metavar="N", help="most tokens to generate (default: model.max_tokens)")
    sm.add_argument("--no-wait", action="store_true", help="return once accepted; the answer goes to the log")
    sm.add_argument("--json", action="store_true", help="print the request's metrics as JSON on stderr")
    socket_arguments(sm)
    sm.set_defaults(func=cmd_submit)

    te = sub.add_parser(
        "teach",
        help="teach the running supervisor an answer: 'QUESTION => ANSWER' (quoted: the shell reads > itself)",
        description="From the next request on, QUESTION and its everyday variants (case, punctuation, politeness "
        "words) get ANSWER, on every front-end; it survives restarts. `llmos forget QUESTION` undoes it.",
    )
    te.add_argument("pair", nargs="*", metavar="'QUESTION => ANSWER'")
    te.add_argument("--list", nargs="?", const="", metavar="WORDS", help="list the taught pairs (with WORDS in them)")
    socket_arguments(te)
    te.set_defaults(func=cmd_teach)

    co = sub.add_parser(
        "consolidate",
        help="put the taught pairs into a new version of the built-in model's weights, when no request runs",
        description="Fine-tunes the built-in model on the taught pairs in the background (paused while requests run "
        "or the board is hot), validates the result, installs it as taught-N and activates it through its gate. "
        "It also runs by itself after learning.consolidate_after idle seconds.",
    )
    co.add_argument("--status", action="store_true", help="say how far consolidation is, start nothing")
    socket_arguments(co)
    co.set_defaults(func=cmd_consolidate)

    fg = sub.add_parser(
        "forget",
        help="forget a taught answer (QUESTION), or a conversation's memory (--memory SOURCE|all)",
    )
    fg.add_argument("question", nargs="*", metavar="QUESTION")
    fg.add_argument(
        "--memory", metavar="SOURCE", help="delete the stored turns of console, submit, http or voice (or all)"
    )
    socket_arguments(fg)
    fg.set_defaults(func=cmd_forget)

    st = sub.add_parser("status", help="the running supervisor's /status")
    socket_arguments(st)
    st.add_argument("--json", action="store_true", help="the structured snapshot as JSON (docs/protocol.md)")
    st.set_defaults(func=cmd_status)

    fr = sub.add_parser(
        "factory-reset",
        help="erase /var (database, installed models, config overrides) at the next boot; asks to confirm",
        description="Writes a request beside the database; on the device llmos-factory-reset.service arms it "
        "(the FactoryReset EFI variable) and reboots, and systemd-repart recreates var in the initrd.",
    )
    fr.add_argument("--yes", action="store_true", help="do not ask for the typed confirmation")
    fr.add_argument("--db", metavar="PATH", help="database file (default: database.path of the config)")
    fr.add_argument("--config", action="append", default=[], metavar="FILE", help="config to find the database in")
    fr.add_argument("--arm", action="store_true", help="(root, run by llmos-factory-reset.service) arm the request")
    fr.add_argument("--efivars", default=str(factory_reset.EFIVARS), help=argparse.SUPPRESS)
    fr.set_defaults(func=cmd_factory_reset)

    he = sub.add_parser(
        "health",
        help="the boot's health gate: wait until the supervisor is ready without a restart (exit 0) or is not (1)",
        description="Run by llmos-health.service before boot-complete.target: a new version's boot counts as good "
        "(systemd-bless-boot keeps it) only when the supervisor reached READY, its model answered the self-test, "
        "and systemd never had to restart it. See docs/updates.md.",
    )
    he.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="how long to wait (default: look once)")
    he.add_argument("--unit", default="llmos.service", help="the supervisor's systemd unit")
    socket_arguments(he)
    he.set_defaults(func=cmd_health)

    up = sub.add_parser(
        "update",
        help="(root) verify a signed update bundle and install it into the other system slot",
        description="Checks SHA256SUMS.gpg against the image's update key and every file against SHA256SUMS while "
        "copying it to /var, runs systemd-sysupdate, then waits until no request is being answered; "
        "llmos-update.service then reboots into the new version. See docs/updates.md.",
    )
    up.add_argument("path", nargs="?", metavar="BUNDLE_DIR", help="the bundle (a directory made by make update-bundle)")
    up.add_argument("--request", metavar="FILE", help="take the bundle directory from a request file (and remove it)")
    up.add_argument("--staging", default="/var/lib/llmos-update", help=argparse.SUPPRESS)
    up.add_argument("--keyring", default="/usr/share/llmos/update-pubring.gpg", help=argparse.SUPPRESS)
    up.add_argument("--no-install", action="store_true", help="verify and stage only")
    up.add_argument("--wait-idle", type=float, default=600, metavar="SECONDS", help="longest wait for idle")
    socket_arguments(up)
    up.set_defaults(func=cmd_update)

    ref = sub.add_parser("config-reference", help="print every config key with its default, as Markdown")
    ref.set_defaults(func=cmd_config_reference)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        return _die(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
