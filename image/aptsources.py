#!/usr/bin/env python3
"""Derive apt sources from the build host's own apt configuration, so no mirror name lives in the repository.

The host already knows a Debian mirror that works from where it stands (a local mirror, a snapshot, a proxy);
the image build and the host's backports repository reuse it.

  aptsources.py host-backports            deb822 text for the host's <codename>-backports (Debian 12 needs
                                          mkosi 24 and systemd 254 from there)
  aptsources.py image --out DIR           DIR/etc/apt/sources.list.d/mkosi.sources (main, updates, security)
                                          for mkosi's package manager tree; mkosi then uses it instead of
                                          its own list, which adds a debian-debug repository mirrors refuse
  aptsources.py firmware [--release R]    deb822 text for R's main and non-free-firmware (the Raspberry Pi's boot
                                          firmware, image/rpiboot.sh)
  aptsources.py codename                  the host's Debian codename (the image is built for the same release,
                                          so wheels built on the host match the image's Python)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

APT_DIR = Path("/etc/apt")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass
class Source:
    types: list[str]
    uris: list[str]
    suites: list[str]
    components: list[str]
    options: dict[str, str] = field(default_factory=dict)


def die(message: str, hint: str = "") -> None:
    print(f"aptsources: {message}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
    raise SystemExit(1)


def parse_deb822(text: str) -> list[Source]:
    sources: list[Source] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if not fields or fields.get("enabled", "yes").lower() == "no":
            continue
        sources.append(
            Source(
                types=fields.get("types", "").split(),
                uris=fields.get("uris", "").split(),
                suites=fields.get("suites", "").split(),
                components=fields.get("components", "").split(),
                options={k: v for k, v in fields.items() if k not in ("types", "uris", "suites", "components")},
            )
        )
    return sources


def parse_one_line(text: str) -> list[Source]:
    sources: list[Source] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        options: dict[str, str] = {}
        if len(words) > 1 and words[1].startswith("["):
            # "deb [signed-by=... arch=...] uri suite comp..."; options end at the word that closes the bracket
            end = next(i for i, w in enumerate(words) if w.endswith("]"))
            for opt in " ".join(words[1 : end + 1]).strip("[]").split():
                k, _, v = opt.partition("=")
                options[k.lower()] = v
            words = [words[0], *words[end + 1 :]]
        if len(words) < 3:
            continue
        sources.append(Source([words[0]], [words[1]], [words[2]], words[3:], options))
    return sources


def host_sources(apt_dir: Path = APT_DIR) -> list[Source]:
    sources: list[Source] = []
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for p in one_line:
        if p.is_file():
            sources += parse_one_line(p.read_text(encoding="utf-8", errors="replace"))
    for p in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        sources += parse_deb822(p.read_text(encoding="utf-8", errors="replace"))
    return [s for s in sources if "deb" in s.types]


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    values: dict[str, str] = {}
    if os_release.is_file():
        for line in os_release.read_text(encoding="utf-8").splitlines():
            k, _, v = line.partition("=")
            values[k] = v.strip().strip('"')
    if values.get("ID") != "debian" or not values.get("VERSION_CODENAME"):
        die("the build host is not a Debian release with a codename", "build the image on Debian 12 or 13")
    return values["VERSION_CODENAME"]


def find_uri(sources: list[Source], suite: str) -> str:
    """The first host URI that serves `suite` with the main component."""
    for s in sources:
        if suite in s.suites and "main" in s.components and s.uris:
            return s.uris[0]
    return ""


def stanza(uri: str, suites: list[str], components: str = "main") -> str:
    return f"Types: deb\nURIs: {uri}\nSuites: {' '.join(suites)}\nComponents: {components}\nSigned-By: {KEYRING}\n"


def archive_uri(sources: list[Source], codename: str) -> str:
    uri = find_uri(sources, codename)
    if not uri:
        die(
            f"no Debian '{codename}' main repository in the host's apt sources",
            "add one to /etc/apt/sources.list.d/debian.sources, then run `apt-get update`",
        )
    return uri


def host_backports(codename: str) -> str:
    sources = host_sources()
    uri = find_uri(sources, f"{codename}-backports") or archive_uri(sources, codename)
    return stanza(uri, [f"{codename}-backports"])


def image_sources(codename: str, components: str = "main") -> str:
    sources = host_sources()
    text = stanza(archive_uri(sources, codename), [codename, f"{codename}-updates"], components)
    security = find_uri(sources, f"{codename}-security")
    if security:
        text += "\n" + stanza(security, [f"{codename}-security"], components)
    else:
        print(f"aptsources: warning: no {codename}-security source on the host; the image gets none", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("codename")
    sub.add_parser("host-backports")
    fw = sub.add_parser("firmware")
    fw.add_argument("--release", help="Debian codename (default: the host's)")
    img = sub.add_parser("image")
    img.add_argument("--out", type=Path, required=True, help="package manager tree to write")
    img.add_argument("--release", help="Debian codename of the image (default: the host's)")
    args = parser.parse_args(argv)

    if args.command == "codename":
        print(host_codename())
    elif args.command == "host-backports":
        sys.stdout.write(host_backports(host_codename()))
    elif args.command == "firmware":
        release = args.release or host_codename()
        sys.stdout.write(stanza(archive_uri(host_sources(), release), [release], "main non-free-firmware"))
    else:
        release = args.release or host_codename()
        target = args.out / "etc/apt/sources.list.d/mkosi.sources"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(image_sources(release), encoding="utf-8")
        print(f"aptsources: wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
