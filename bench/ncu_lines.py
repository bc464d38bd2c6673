#!/usr/bin/env python3
"""Per-source-line totals of an Nsight Compute SASS profile: which lines of kvq a kernel's executed
instructions and stall samples come from.

    python3 bench/ncu_lines.py NCU_SASS_CSV[.gz] SASS_WITH_LINES[.gz] [--top N]

NCU_SASS_CSV: `ncu --import R --page source --csv --print-source sass` of one kernel (per-instruction
counts, absolute addresses). SASS_WITH_LINES: `nvdisasm -g -c` of the cubins of the same binary
(`cuobjdump -xelf all BINARY`), which gives each instruction's file and line. The profiled function
is found among the disassembled ones as the one whose opcodes match the profile's, instruction for
instruction (ncu's CSV does not name it); a line's totals are those of the instructions nvdisasm
attributes to it (the innermost inlined location). .ci/gpu-focus runs this with KVQ_NCU_SOURCE=1.
"""
import argparse
import collections
import csv
import gzip
import io
import re
import sys


def open_text(path):
    return io.TextIOWrapper(gzip.open(path), errors="replace") if path.endswith(".gz") else open(path, errors="replace")


def read_profile(path):
    """[(opcode, instructions executed, stall samples)] in address order."""
    rows = list(csv.reader(open_text(path)))
    head = next(i for i, r in enumerate(rows) if "Source" in r and any(c.startswith("Warp Stall Sampling (All") for c in r))
    h = rows[head]
    src, addr = h.index("Source"), h.index("Address")
    executed = next(i for i, c in enumerate(h) if c.startswith("Instructions Executed"))
    samples = next(i for i, c in enumerate(h) if c.startswith("Warp Stall Sampling (All"))
    out = []
    for r in rows[head + 1:]:
        if len(r) <= max(src, executed, samples) or not r[addr].startswith("0x"):
            continue
        out.append((int(r[addr], 16), opcode(r[src]), float(r[executed] or 0), float(r[samples] or 0)))
    out.sort()
    return [(op, n, s) for _, op, n, s in out]


def opcode(text):
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def read_functions(path):
    """{function name: [(opcode, (file, line))]} from nvdisasm -g output."""
    functions, name, loc = {}, None, None
    for line in open_text(path):
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            name, loc = m.group(1), None
            functions[name] = []
            continue
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if m:
            loc = (m.group(1).split("/")[-1], int(m.group(2)))
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m and name is not None:
            functions[name].append((opcode(m.group(1)), loc))
    return functions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("sass")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    prof = read_profile(args.profile)
    ops = [op for op, _, _ in prof]
    best, best_match = None, 0.0
    for name, instrs in read_functions(args.sass).items():
        if len(instrs) != len(prof):
            continue
        match = sum(a == b for a, (b, _) in zip(ops, instrs)) / len(prof)
        if match > best_match:
            best, best_match = name, match
    if best is None or best_match < 0.99:
        sys.exit(f"ncu_lines: no disassembled function matches the profile's {len(prof)} instructions"
                 f" (best {best_match:.0%}); was the SASS taken from the profiled binary?")
    instrs = read_functions(args.sass)[best]
    executed, samples = collections.Counter(), collections.Counter()
    for (_, n, s), (_, loc) in zip(prof, instrs):
        executed[loc] += n
        samples[loc] += s
    total_n, total_s = sum(executed.values()) or 1, sum(samples.values()) or 1
    print(f"{best}: {len(prof)} instructions, {total_n:.0f} warp instructions executed, {total_s:.0f} stall samples")
    print(f"{'% executed':>10} {'% samples':>9}  file:line")
    for loc, n in executed.most_common(args.top):
        where = f"{loc[0]}:{loc[1]}" if loc else "?"
        print(f"{100 * n / total_n:10.1f} {100 * samples[loc] / total_s:9.1f}  {where}")


if __name__ == "__main__":
    main()
