#!/usr/bin/env python3
"""Sign an esl-agent task or command (docs/SECURITY.md, "Signed tasks").

Reads one JSON object (a task or a command) on stdin and writes it with a
"sig" field added:

    sig = {"kid": KID, "hmac": hex(HMAC-SHA256(key, signing_input))}
    signing_input = "esl-sig-v1\\n" + purpose + "\\n" + client_id + "\\n"
                    + kid + "\\n" + JCS(message without "sig")

JCS is RFC 8785 (JSON Canonicalization Scheme). Standard library only, so a
back end can copy `canonical()` and `sign()` as they are.

    ./sign_task.py --key-file k1.key --kid k1 --client-id GID_esl@@@a4b1c2d3e4f5 < task.json
    ./sign_task.py --self-test
"""

import argparse
import hashlib
import hmac
import json
import os
import sys

DOMAIN = "esl-sig-v1"


def es_number(x):
    """ECMAScript Number::toString (ECMA-262 7.1.12.1), as JCS prescribes."""
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError("JSON has no NaN or infinity")
    if x == 0:
        return "0"  # also -0
    if x < 0:
        return "-" + es_number(-x)
    # repr() gives the shortest digits that round-trip, like ECMAScript.
    mantissa, _, exp = repr(x).partition("e")
    int_part, _, frac = mantissa.partition(".")
    digits = int_part + frac
    point = len(int_part) + (int(exp) if exp else 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point  # x = 0.digits * 10^n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    rest = "." + digits[1:] if k > 1 else ""
    return digits[0] + rest + "e" + ("+" if e >= 0 else "-") + str(abs(e))


def canonical(value):
    """RFC 8785 canonical JSON text of a parsed JSON value."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        # JCS treats every number as an IEEE double.
        return es_number(float(value))
    if isinstance(value, str):
        # Python's escapes equal JSON.stringify's: \" \\ \b \f \n \r \t,
        # \u00xx for other controls, everything else literal.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        # Keys in UTF-16 code unit order (not code point order).
        keys = sorted(value, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(canonical(k) + ":" + canonical(value[k]) for k in keys) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


def signing_input(purpose, client_id, kid, message):
    unsigned = {k: v for k, v in message.items() if k != "sig"}
    text = f"{DOMAIN}\n{purpose}\n{client_id}\n{kid}\n" + canonical(unsigned)
    return text.encode("utf-8")


def sign(key, purpose, client_id, kid, message):
    """Returns `message` with its "sig" field set."""
    mac = hmac.new(key.encode("utf-8"), signing_input(purpose, client_id, kid, message), hashlib.sha256)
    signed = dict(message)
    signed["sig"] = {"kid": kid, "hmac": mac.hexdigest()}
    return signed


def self_test():
    """The reference vector of agent/src/security/signing.rs (computed with Node)."""
    task = {"v": 1, "task_id": "t-1", "tag_id": "SIM000001", "seq": 5,
            "issued_at": 1764230400000, "ttl_ms": 3600000,
            "content": {"price": "9.90", "name": "Milk 1L", "w": 1.5}}
    got = sign("k2026a-0123456789abcdef0123456789abcdef", "task", "GID_esl@@@a4b1c2d3e4f5", "k1", task)
    want = "aeeb171504f5bbbc7735d0ad3dadc04c1c60ca15b66f1309e6d951c5d9349ae9"
    assert got["sig"]["hmac"] == want, got["sig"]["hmac"]
    for bits, text in [(0x0000000000000001, "5e-324"), (0x444b1ae4d6e2ef50, "1e+21"),
                       (0x3eb0c6f7a0b5ed8d, "0.000001"), (0xbecbf647612f3696, "-0.0000033333333333333333"),
                       (0x43143ff3c1cb0959, "1424953923781206.2")]:
        import struct
        x = struct.unpack(">d", bits.to_bytes(8, "big"))[0]
        assert es_number(x) == text, (hex(bits), es_number(x), text)
    assert canonical({"\u20ac": 1, "\r": 2, "\ufb33": 3, "1": 4, "\U0001F600": 5, "\u0080": 6, "\u00f6": 7}) == \
        '{"\\r":2,"1":4,"\u0080":6,"\u00f6":7,"\u20ac":1,"\U0001F600":5,"\ufb33":3}'
    print("self-test passed")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key-file", help="file holding the key (surrounding white space is ignored)")
    p.add_argument("--key-env", help="environment variable holding the key")
    p.add_argument("--kid", help="key id, as in [[security.signing_keys]] id")
    p.add_argument("--client-id", help="the receiving agent's client id, GROUP@@@DEVICE")
    p.add_argument("--purpose", choices=["task", "command"], default="task")
    p.add_argument("--self-test", action="store_true")
    a = p.parse_args()
    if a.self_test:
        self_test()
        return
    if not a.kid or not a.client_id or bool(a.key_file) == bool(a.key_env):
        p.error("need --kid, --client-id and one of --key-file / --key-env")
    if a.key_file:
        with open(a.key_file, encoding="utf-8") as f:
            key = f.read().strip()
    else:
        key = os.environ[a.key_env].strip()
    message = json.load(sys.stdin)
    if not isinstance(message, dict):
        p.error("stdin must hold one JSON object")
    json.dump(sign(key, a.purpose, a.client_id, a.kid, message), sys.stdout, ensure_ascii=False, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
