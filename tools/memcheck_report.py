"""tools/memcheck_report.py - reads a valgrind memcheck log and sorts its errors into those whose
stack passes through smallmind's compiled core (csrc/*.c, the Cython module) and the rest (the
dynamic loader, CPython's small-int and dict tricks, which valgrind cannot model and which are not
ours to fix). Prints both counts and the first of ours in full; exits 1 if any error is ours."""
import re
import sys

KINDS = ("Invalid read", "Invalid write", "Use of uninitialised", "Conditional jump",
         "Invalid free", "Mismatched free", "Syscall param", "Source and destination overlap",
         "Argument 'size'")
OURS = re.compile(r"\((sm_\w+\.[ch]|_core\.c|_core\.pyx|_\w+\.pxi):\d+\)|_core\.cpython")


def error_blocks(lines):
    """Yield the stack of each error report: its lines up to the next blank '==pid== ' line."""
    block = []
    for raw in lines:
        line = re.sub(r"^==\d+== ?", "", raw.rstrip("\n"))
        if line.strip():
            block.append(line)
            continue
        if block and block[0].startswith(KINDS):
            yield block
        block = []
    if block and block[0].startswith(KINDS):
        yield block


def main(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        blocks = list(error_blocks(f))
    ours = [b for b in blocks if any(OURS.search(line) for line in b)]
    summary = next((l for l in open(path, errors="replace") if "ERROR SUMMARY" in l), "").strip()
    print(f"memcheck: {len(blocks)} error contexts in all, {len(ours)} through smallmind's code")
    print(f"memcheck: valgrind's {summary.split('== ', 1)[-1]}")
    if ours:
        print("first of ours:\n  " + "\n  ".join(ours[0]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
