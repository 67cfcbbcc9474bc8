#!/usr/bin/env python3
"""Writes the `event` target's seeds from `tcpwait trace --json` lines (stdin): each line back
into the wire layout of `TransitionEvent` (tcpwait-common/src/lib.rs), one record per distinct
transition, one batch record of all of them as the kernel program stages them, and the same
batch with its halves swapped (two CPUs' batches arriving out of order); plus the malformed
records the decoder counts. Used once, on kernel 6.18:

    tcpwait trace --json --port 47811 --port 47812 > trace.json   # while a client and a server
    fuzz/seed_events.py fuzz/corpus/event < trace.json             # close on those ports
"""
import ipaddress, json, struct, sys, os

STATES = ["", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
          "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"]


def wire(e):
    fam = 2 if e["family"] == 4 else 10
    addr = lambda a: ipaddress.ip_address(a).packed.ljust(16, b"\0")
    return struct.pack("<QQQ16s16s16sHHHBBII", e["ts_ns"], int(e["skaddr"], 16),
                       e["pid"] << 32 | e["tid"], addr(e["saddr"]), addr(e["daddr"]),
                       e["comm"].encode()[:16].ljust(16, b"\0"), e["sport"], e["dport"], fam,
                       STATES.index(e["old"]), STATES.index(e["new"]), e["netns"], 0)


out = sys.argv[1]
events = [wire(json.loads(l)) for l in sys.stdin if l.strip()]
seen = set()
for e in events:
    key = (e[76:78], e[78:80])
    if key not in seen:
        seen.add(key)
        open(os.path.join(out, f"one-{len(seen):02}"), "wb").write(e)
open(os.path.join(out, "batch"), "wb").write(b"".join(events))
half = len(events) // 2
open(os.path.join(out, "batch-two-cpus"), "wb").write(b"".join(events[half:] + events[:half]))
e = events[0]
open(os.path.join(out, "truncated-80"), "wb").write(e[:80])
open(os.path.join(out, "oversize-96"), "wb").write(e + bytes(8))
open(os.path.join(out, "unknown-state"), "wb").write(e[:78] + b"\x0d" + e[79:])
open(os.path.join(out, "unknown-family"), "wb").write(e[:76] + b"\x01\x00" + e[78:])
open(os.path.join(out, "batch-and-a-half"), "wb").write(b"".join(events[:3]) + e[:40])
