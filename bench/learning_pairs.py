"""Fifty taught pairs for `make bench-learning`: household and office facts a person would teach the device, in
ten shapes with five fillers each (the first ten pairs are one of each shape). `dev_pairs` are ten more of the same
shapes with fillers of their own, for tuning the recipe (bench/learning_dev.py): none of them is a judged pair."""

from __future__ import annotations

SHAPES = [
    ("what is the {x} wifi password", "The {x} wifi password is {y}."),
    ("where is the {x}", "The {x} is {y}."),
    ("who is on call on {x}", "{y} is on call on {x}."),
    ("when does the {x} open", "The {x} opens at {y}."),
    ("what is the code for the {x}", "The {x} code is {y}."),
    ("how do i reset the {x}", "Hold the {x} button for {y} seconds."),
    ("what is {x}'s phone number", "{x} is on extension {y}."),
    ("which bin is for {x}", "{x} goes in the {y} bin."),
    ("what day is {x} collected", "{x} is collected on {y}."),
    ("what is the name of the {x}", "The {x} is called {y}."),
]
FILLERS = [
    [
        ("guest", "sunflower42"),
        ("office", "blue-kettle-7"),
        ("garden", "mossy-stone"),
        ("lab", "quartz19"),
        ("loft", "owl-and-moon"),
    ],
    [
        ("manual", "in the top drawer"),
        ("spare key", "under the blue pot"),
        ("first aid kit", "by the back door"),
        ("ladder", "in the garage"),
        ("remote", "on the bookshelf"),
    ],
    [("monday", "Ada"), ("tuesday", "Ben"), ("wednesday", "Chloe"), ("thursday", "Dev"), ("friday", "Eva")],
    [("library", "nine"), ("pharmacy", "eight thirty"), ("gym", "six"), ("bakery", "seven"), ("post office", "ten")],
    [("front door", "4711"), ("bike lock", "2580"), ("safe", "1357"), ("gate", "8642"), ("locker", "3141")],
    [("router", "ten"), ("printer", "five"), ("heater", "three"), ("doorbell", "eight"), ("camera", "twelve")],
    [("anna", "214"), ("bob", "305"), ("carla", "118"), ("dmitri", "422"), ("emma", "509")],
    [("glass", "green"), ("paper", "blue"), ("plastic", "yellow"), ("food", "brown"), ("metal", "grey")],
    [
        ("paper", "monday"),
        ("glass", "friday"),
        ("garden waste", "wednesday"),
        ("plastic", "tuesday"),
        ("rubbish", "thursday"),
    ],
    [("cat", "Miso"), ("dog", "Pepper"), ("robot vacuum", "Dusty"), ("boat", "Sea Breeze"), ("plant", "Gerald")],
]

DEV_FILLERS = [
    ("studio", "amber-fox-3"),
    ("umbrella", "behind the coat rack"),
    ("saturday", "Farid"),
    ("museum", "eleven"),
    ("shed", "9021"),
    ("modem", "fifteen"),
    ("greta", "617"),
    ("cardboard", "orange"),
    ("batteries", "saturday"),
    ("fish", "Bubbles"),
]


def _pair(shape: tuple[str, str], x: str, y: str) -> tuple[str, str]:
    q, a = shape
    return q.format(x=x), a.format(x=x[:1].upper() + x[1:] if a.startswith("{x}") else x, y=y)


def pairs(n: int) -> list[tuple[str, str]]:
    out = [_pair(shape, *fill[k]) for k in range(5) for shape, fill in zip(SHAPES, FILLERS, strict=True)]
    return out[:n]


def dev_pairs() -> list[tuple[str, str]]:
    return [_pair(shape, *fill) for shape, fill in zip(SHAPES, DEV_FILLERS, strict=True)]
