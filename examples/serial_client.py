"""Ask llmos-edge over its serial console in machine mode (docs/protocol.md), as a program on the other end of the
cable would:  python3 examples/serial_client.py /dev/ttyUSB0 "ping" "reverse stone"
"""

import json
import sys
import time

import serial  # pip install pyserial


def events(port, timeout=120.0):
    """The appliance's events, one JSON object a line; anything else (boot messages, the echo of /json) is skipped."""
    buf, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        buf += port.read(port.in_waiting or 1)
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                yield event
    raise TimeoutError("llmos-edge did not answer")


def ask(device, prompts):
    answers = {i: "" for i in range(len(prompts))}
    with serial.Serial(device, 115200, timeout=0.5) as port:
        port.write(b"\r/json\r")  # the \r first ends whatever was half typed on the console
        stream = events(port)
        while next(stream) != {"event": "mode", "mode": "json"}:
            pass
        for i, prompt in enumerate(prompts):  # all in flight at once; events carry the id we chose
            port.write(json.dumps({"op": "submit", "id": i, "prompt": prompt}).encode() + b"\n")
        pending = set(answers)
        for event in stream:
            if event["event"] == "token":
                answers[event["id"]] += event["text"]
            elif event["event"] in ("done", "error"):
                if event["event"] == "error" or event["outcome"] != "ok":
                    print(f"request {event['id']}: {event.get('message') or event.get('error')}", file=sys.stderr)
                pending.discard(event["id"])
                if not pending:
                    break
        port.write(b'{"op": "exit"}\n')  # back to the human prompt
        while next(stream) != {"event": "mode", "mode": "human"}:
            pass
    return [answers[i].strip() for i in range(len(prompts))]


if __name__ == "__main__":
    for prompt, answer in zip(sys.argv[2:], ask(sys.argv[1], sys.argv[2:]), strict=True):
        print(f"{prompt} -> {answer}")
