"""Training data, held-out evaluation set and tokenizer of llmos-tiny, the model the project builds itself.

Pure Python on purpose (no torch, no numpy): unit tests and the supervisor's integration tests import this module
without the build-time training environment. It lives in the package because on-device consolidation
(finetune.py) replays this generator's examples beside the taught pairs; model/data.py re-exports it for the
build scripts.

Two tasks, both answered exactly:
  * a device FAQ: 12 intents, each with many phrasings built as prefix x core phrase x suffix x casing. Whole
    (prefix, core, suffix) combinations are held out, so every held-out prompt is a combination never trained on;
    each of its parts is trained in other combinations (it tests recombination of known parts, not new wording).
  * "reverse <word>": pseudo-random lowercase words of 3-10 letters; held-out words never appear in training.

Prompt contract with the engine: llama.cpp is given BOS + prompt + "\\n", the model answers and emits EOS.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEED = 1234

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: SPM-style vocabulary llama.cpp accepts (see FINDINGS): <unk> <s> </s>, the 256 byte tokens used as
# fallback for anything else (e.g. the newline), then one token per printable ASCII character, space as U+2581.
# ---------------------------------------------------------------------------------------------------------------
UNK, BOS, EOS = 0, 1, 2
SPACE_MARK = "\u2581"
# gguf token types
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6

_CHARS = [SPACE_MARK] + [chr(c) for c in range(0x21, 0x7F)]
VOCAB: list[str] = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _CHARS
TOKEN_TYPES: list[int] = (
    [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256 + [TOKEN_NORMAL] * len(_CHARS)
)
_CHAR_ID = {c: i for i, c in enumerate(VOCAB) if i >= 3 + 256}
_BYTE_BASE = 3


def encode(text: str) -> list[int]:
    """Token ids as llama.cpp's SPM tokenizer produces them for this vocabulary (no BOS, no space prefix).

    There are no multi-character tokens, so no merges happen: a known character maps to its token, anything else
    falls back to its UTF-8 bytes, exactly like llama.cpp's byte fallback.
    """
    ids: list[int] = []
    for ch in text.replace(" ", SPACE_MARK):
        tok = _CHAR_ID.get(ch)
        if tok is not None:
            ids.append(tok)
        else:
            ids.extend(_BYTE_BASE + b for b in ch.encode("utf-8"))
    return ids


def decode(ids: list[int]) -> str:
    out = bytearray()
    for t in ids:
        if t < 3:
            continue
        if t < 3 + 256:
            out.append(t - _BYTE_BASE)
        else:
            out.extend(VOCAB[t].replace(SPACE_MARK, " ").encode("utf-8"))
    return out.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# Task (a): the device FAQ
# ---------------------------------------------------------------------------------------------------------------
FAQ_ANSWERS: dict[str, str] = {
    "help": "Ask me a question, or type /help for commands.",
    "model": "I am llmos-tiny, a small llama model running offline.",
    "status": "Type /status to see model, speed, memory and uptime.",
    "temperature": "Type /status to see the board temperature.",
    "reset": "To factory reset, delete /var/lib/llmos and reboot.",
    "identity": "I am llmos-edge, an offline LLM appliance.",
    "logs": "Type /logs to see recent requests.",
    "cancel": "Press Ctrl-C or type /cancel to stop an answer.",
    "network": "I work fully offline; no network is needed.",
    "ping": "pong",
    "hello": "Hello! Ask me a question.",
    "abilities": "I answer questions and reverse words, offline.",
}

# Core phrases: the part that decides the intent. The first core of each intent is its bare keyword and is always
# trained on its own (the engine's self-test asks exactly "ping").
FAQ_CORES: dict[str, list[str]] = {
    "help": [
        "help",
        "help me",
        "i need help",
        "how do i use this",
        "how does this work",
        "what are the commands",
        "show me the commands",
        "list the commands",
        "how do i get started",
    ],
    "model": [
        "what model is this",
        "which model is this",
        "what model are you",
        "which model are you running",
        "what llm is this",
        "what language model do you use",
        "tell me about the model",
        "what model is running",
        "name of the model",
    ],
    "status": [
        "status",
        "show status",
        "system status",
        "how is the system doing",
        "how fast are you",
        "how much memory is used",
        "what is the uptime",
        "show me the speed",
        "are you healthy",
    ],
    "temperature": [
        "temperature",
        "what is the temperature",
        "how hot is the board",
        "is the device overheating",
        "board temperature",
        "cpu temperature",
        "how warm is it running",
        "is it too hot",
    ],
    "reset": [
        "factory reset",
        "how do i factory reset",
        "reset to factory settings",
        "wipe everything",
        "how do i reset the device",
        "erase all data",
        "restore factory defaults",
        "start over from scratch",
    ],
    "identity": [
        "who are you",
        "what is this",
        "what are you",
        "what is this device",
        "what is llmos",
        "what is llmos-edge",
        "introduce yourself",
        "what am i talking to",
    ],
    "logs": [
        "logs",
        "history",
        "show logs",
        "show me the history",
        "where are the logs",
        "recent requests",
        "what did i ask before",
        "view the request log",
        "show past questions",
    ],
    "cancel": [
        "stop",
        "cancel",
        "how do i stop an answer",
        "cancel an answer",
        "how to cancel a reply",
        "stop generating",
        "interrupt the answer",
        "abort the response",
        "make it stop talking",
    ],
    "network": [
        "network",
        "internet",
        "wifi",
        "do you need internet",
        "how do i connect to wifi",
        "are you online",
        "do you need a network",
        "set up the network",
        "connect to the internet",
        "is wifi required",
    ],
    "ping": ["ping", "ping ping", "ping test", "send a ping"],
    "hello": [
        "hello",
        "hi",
        "hey",
        "hello there",
        "hi there",
        "good morning",
        "good evening",
        "greetings",
        "howdy",
    ],
    "abilities": [
        "what can you do",
        "what are you able to do",
        "what are your skills",
        "what do you know how to do",
        "what tasks can you handle",
        "what are you good at",
        "what can i ask you",
        "what features do you have",
    ],
}

FAQ_PREFIXES: list[str] = [
    "",
    "hey llmos, ",
    "llmos, ",
    "hi llmos, ",
    "please, ",
    "please ",
    "can you tell me ",
    "could you tell me ",
    "tell me ",
    "ok llmos ",
    "excuse me, ",
    "quick question: ",
    "question: ",
    "so ",
    "um, ",
    "hey, ",
    "i wonder ",
    "yo llmos ",
]
FAQ_SUFFIXES: list[str] = ["", "?", ".", "!", " please", " please?", "??", ", thanks", " thank you", "?!"]
CASINGS: list[str] = ["lower", "capital", "upper", "title"]

HELDOUT_FAQ_PER_INTENT = 20
HELDOUT_REVERSE_PER_LENGTH = 25
WORD_LENGTHS = range(3, 11)


@dataclass(frozen=True)
class Example:
    task: str  # "faq" | "reverse"
    prompt: str
    answer: str


def _apply_case(text: str, casing: str) -> str:
    if casing == "upper":
        return text.upper()
    if casing == "capital":
        return text[:1].upper() + text[1:]
    if casing == "title":
        return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    return text


def _stable_key(*parts: str) -> str:
    # hashlib, not hash(): str hashing is salted per process and would make the split differ between runs.
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _faq_combos(intent: str) -> list[tuple[str, str, str]]:
    return [(p, c, s) for c in FAQ_CORES[intent] for p in FAQ_PREFIXES for s in FAQ_SUFFIXES]


def _heldout_faq_combos() -> dict[str, list[tuple[str, str, str]]]:
    """Per intent, the (prefix, core, suffix) combinations kept out of training: a stable hash order, skipping the
    bare core words so the plain keyword ("ping", "help", ...) is always learned."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for intent in FAQ_ANSWERS:
        combos = [c for c in _faq_combos(intent) if c[0] or c[2]]
        combos.sort(key=lambda c: _stable_key("faq-heldout", intent, *c))
        out[intent] = combos[:HELDOUT_FAQ_PER_INTENT]
    return out


def _random_word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def heldout_examples() -> list[Example]:
    """The held-out evaluation set: deterministic, disjoint from anything training_examples() yields."""
    rng = random.Random(SEED * 7 + 1)
    examples: list[Example] = []
    for intent, combos in _heldout_faq_combos().items():
        for prefix, core, suffix in combos:
            prompt = _apply_case(prefix + core + suffix, rng.choice(CASINGS))
            examples.append(Example("faq", prompt, FAQ_ANSWERS[intent]))
    words: set[str] = set()
    for length in WORD_LENGTHS:
        n = 0
        while n < HELDOUT_REVERSE_PER_LENGTH:
            w = _random_word(rng, length)
            if w not in words:
                words.add(w)
                n += 1
                examples.append(Example("reverse", f"reverse {w}", w[::-1]))
    return examples


class TrainingStream:
    """An endless, deterministic stream of training examples; held-out prompts and words are excluded."""

    def __init__(self, seed: int = SEED, reverse_fraction: float = 0.6, bare_fraction: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.reverse_fraction = reverse_fraction
        # The bare keywords ("ping", "logs", "hello") are one combination among thousands each, yet what people
        # type most and what the self-test asks: this share of FAQ examples is a bare keyword.
        self.bare_fraction = bare_fraction
        held = _heldout_faq_combos()
        self.faq: list[tuple[tuple[str, str, str], str]] = []
        for intent in FAQ_ANSWERS:
            excluded = set(held[intent])
            self.faq.extend((c, intent) for c in _faq_combos(intent) if c not in excluded)
        heldout = heldout_examples()
        self.heldout_words = {e.prompt.split(" ", 1)[1] for e in heldout if e.task == "reverse"}
        # A held-out combination in another casing, or an identical string from a different combination, must
        # never be trained on either: compare the final lowercase strings too.
        self.heldout_faq_lower = {e.prompt.lower() for e in heldout if e.task == "faq"}

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        rng = self.rng
        if rng.random() < self.reverse_fraction:
            while True:
                w = _random_word(rng, rng.choice(WORD_LENGTHS))
                if w not in self.heldout_words:
                    return Example("reverse", f"reverse {w}", w[::-1])
        if self.bare_fraction and rng.random() < self.bare_fraction:
            intent = rng.choice(list(FAQ_ANSWERS))
            return Example("faq", FAQ_CORES[intent][0], FAQ_ANSWERS[intent])
        while True:
            (prefix, core, suffix), intent = rng.choice(self.faq)
            text = prefix + core + suffix
            if text.lower() in self.heldout_faq_lower:
                continue
            # Lowercase most, the way people type at a console; every other casing often enough to be learned (an
            # upper-case letter is a different token, so each casing is nearly a task of its own).
            casing = rng.choices(CASINGS, weights=[2, 1, 1, 1])[0]
            return Example("faq", _apply_case(text, casing), FAQ_ANSWERS[intent])


def training_examples(n: int, seed: int = SEED) -> list[Example]:
    stream = TrainingStream(seed)
    return [next(stream) for _ in range(n)]


def example_tokens(ex: Example) -> tuple[list[int], list[int]]:
    """<s>prompt\\nanswer</s> as ids, and a 0/1 mask marking the answer tokens and the EOS (what the loss sees)."""
    prompt = [BOS, *encode(ex.prompt + "\n")]
    answer = [*encode(ex.answer), EOS]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def packed_window(stream: Iterator[Example], ctx: int) -> tuple[list[int], list[int]]:
    """One training window of exactly ctx tokens: whole examples from position 0 (as at inference), and the last
    one cut at the window's end. This is also the shape later on-device fine-tuning data has."""
    ids: list[int] = []
    mask: list[int] = []
    while len(ids) < ctx:
        t, m = example_tokens(next(stream))
        ids.extend(t)
        mask.extend(m)
    return ids[:ctx], mask[:ctx]


def write_heldout(path: Path) -> None:
    with path.open("w") as f:
        for e in heldout_examples():
            f.write(json.dumps({"task": e.task, "prompt": e.prompt, "answer": e.answer}) + "\n")


if __name__ == "__main__":
    import sys

    write_heldout(Path(sys.argv[1] if len(sys.argv) > 1 else "model/heldout.jsonl"))
