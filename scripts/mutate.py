#!/usr/bin/env python3
# ruff: noqa: E501 - the mutation patterns are verbatim source lines, kept whole so they can be grepped
"""A small mutation runner for the durability code (no dependency beyond the project's venv).

Each mutant is one hand-written textual edit of appliance/store/{commit,segments,online,compact}.py that breaks a
guarantee (a sync skipped, an answer sent early, a truncate left out...). For each mutant, in turn, the runner
copies the tree (appliance/, tests/, bench/, tiering/, pyproject.toml; as committed in HEAD unless --working-tree)
into a fresh temp dir, applies the edit there
(never in the checkout), runs the tests that guard the code, and reports the mutant KILLED (a test failed) or
SURVIVED (every test passed: either a test is missing or the mutant is equivalent; the report says which).

    .venv/bin/python scripts/mutate.py [--jobs 2] [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("appliance", "tests", "bench", "tiering", "pyproject.toml")
GUARDS = [
    "tests/conformance",
    "tests/unit/test_commit_ordering.py",
    "tests/unit/test_commit_failures.py",
    "tests/crash/test_power_loss.py",
    "tests/crash/test_lost_index_commit.py",
    "tests/unit/test_index.py",
    "tests/unit/test_commit.py",
]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the tree
    old: str  # must occur exactly once
    new: str
    why: str  # the guarantee it breaks


COMMIT, SEG, ONLINE, COMPACT = ("appliance/store/commit.py", "appliance/store/segments.py", "appliance/store/online.py",
              "appliance/store/compact.py")

MUTANTS = [
    # ---- segments.py: durability of appends, recovery
    Mutant("segments-fdatasync-pass", SEG, "                    os.fdatasync(fd)  # data and size", "                    pass  # data and size",
           "sync() returns without flushing: acknowledged bytes live only in the page cache"),
    Mutant("segments-sync-error-swallowed", SEG, "            except OSError as exc:\n                raise StorageFault(f\"fdatasync of a segment",
           "            except OSError as exc:\n                continue\n                raise StorageFault(f\"fdatasync of a segment",
           "a failed fdatasync is ignored: the group is acknowledged on an untrusted page cache"),
    Mutant("segments-put-no-truncate", SEG, "                os.ftruncate(self._fd, start)", "                pass",
           "a torn append (ENOSPC mid-record) is left in the segment file"),
    Mutant("segments-put-keeps-torn-end", SEG, "        self._end = data_offset + meta.size + len(pad)\n",
           "        self._end = data_offset + meta.size + len(pad)\n        self._end += 0\n",
           "(control: a no-op edit; must SURVIVE, shows the runner does not kill everything)"),
    Mutant("segments-recover-no-truncate", SEG, "                fh.truncate(pos)", "                pass",
           "recover keeps a torn tail beyond the last whole record"),
    Mutant("segments-recover-no-hash-check", SEG, "            if self.sha256(location) != meta.digest:",
           "            if False:", "recover re-indexes a record whose bytes never reached the disk whole"),
    Mutant("segments-recover-drops-durable-tail", SEG, "            tail.append(StoredBlob(location, meta))\n",
           "            return pos, False\n", "recover cuts durable records an index transaction named but lost"),
    Mutant("segments-recover-no-seal", SEG, "                fh.write(END_OF_ARCHIVE)", "                pass",
           "recover leaves the previous run's segment without its end-of-archive"),
    Mutant("segments-recover-unknown-truncated", SEG, "            end = committed_end(segment)\n",
           "            end = committed_end(segment) or 0\n", "recover truncates a segment the index does not know"),
    Mutant("segments-roll-no-end-of-archive", SEG, "            self._pwrite_all([END_OF_ARCHIVE], self._end)\n",
           "            pass\n",
           "a sealed segment lacks the tar end-of-archive"),
    Mutant("segments-register-after-first-byte", SEG,
           "            if self.on_create is not None:\n                self.on_create(name, created_ns(name))",
           "            pass", "a segment is written without being registered in the index first"),
    # ---- commit.py: order and answers
    Mutant("commit-answer-before-apply", COMMIT, "            applied = self.index.apply(entries, self.policy,",
           "            self._resolve([(item, CommitResult(errors.SUCCESS, None)) for item in batch])\n"
           "            applied = self.index.apply(entries, self.policy,",
           "Success is sent before the index commit"),
    Mutant("commit-no-backend-sync", COMMIT, "            backend.sync()  # raises StorageFault", "            pass  # raises StorageFault",
           "the group is committed without its bytes being synced"),
    Mutant("commit-skip-resolve-refused", COMMIT, "        if refused:\n            self._resolve(refused)",
           "        if refused:\n            pass", "an instance refused by the backend (ENOSPC) is never answered"),
    Mutant("commit-index-error-unanswered", COMMIT,
           "            log.exception(\"group commit failed before the index commit\")\n            self._resolve(",
           "            log.exception(\"group commit failed before the index commit\")\n            return\n            self._resolve(",
           "a batch whose index transaction failed is never answered"),
    Mutant("commit-lmdb-fatal-not-fail-stop", COMMIT, "_LMDB_FATAL = (lmdb.DiskError, lmdb.PanicError, lmdb.CorruptedError, lmdb.InvalidError)",
           "_LMDB_FATAL = (lmdb.PanicError,)", "an LMDB disk error is treated as an ordinary batch failure"),
    Mutant("commit-fail-stop-unanswered", COMMIT,
           "        self.fault = reason\n        self._resolve(", "        self.fault = reason\n        return\n        self._resolve(",
           "a storage fault leaves its batch unanswered"),
    Mutant("commit-write-failure-unanswered", COMMIT,
           "            except Exception:\n                log.exception(\"appending a group to its segments\")\n                self._resolve(",
           "            except Exception:\n                log.exception(\"appending a group to its segments\")\n                (",
           "an unexpected error while appending leaves the group unanswered"),
    Mutant("commit-fault-ignored-by-writer", COMMIT, "            if self.fault is not None:\n                refused.append",
           "            if False:\n                refused.append",
           "after a storage fault, queued instances are still appended and acknowledged"),
    Mutant("commit-fault-ignored-by-indexer", COMMIT, "        if self.fault is not None:\n            self._resolve([(item, CommitResult(errors.OUT_OF_RESOURCES",
           "        if False:\n            self._resolve([(item, CommitResult(errors.OUT_OF_RESOURCES",
           "after a storage fault, durable groups are still committed and acknowledged"),
    Mutant("commit-ends-not-recorded", COMMIT, "committed_ends(e.copy for e in entries), sealed,",
           "{}, sealed,", "the index never learns how far a segment is committed: recovery re-verifies every record"),
    # ---- online.py: startup recovery
    Mutant("online-recover-skips-backend", ONLINE, "        result = backend.recover(committed_end)",
           "        continue",
           "startup neither truncates torn tails nor seals the previous run's segments"),
    Mutant("online-recover-no-seal-in-index", ONLINE,
           "        index.seal_containers(name, [c.name for c in index.containers(name) if not c.sealed])", "        pass",
           "the index keeps the previous run's segments open (never compacted, differs from a rebuild)"),
    Mutant("online-recover-no-gc", ONLINE,
           "    totals[\"deleted\"] = index.collect_garbage(index.pending_gc(), lambda b, n: _remove(store, b, n))",
           "    pass", "a compaction interrupted before deleting its old segment is never finished"),
    Mutant("online-recover-end-unknown", ONLINE, "            return None if rec is None else rec.end", "            return None",
           "recovery treats every segment as unknown: torn tails stay"),
    Mutant("online-recover-ends-first-chunk", ONLINE, "            last = start + 512 >= len(tail)",
           "            last = start == 0", "a crash during recovery leaves records below their committed end, unindexed"),
    # ---- index (lazy meta page)
    Mutant("index-gc-no-sync", "appliance/index/containers.py",
           "            self.env.sync(True)  # the transaction that stopped naming them", "            pass  # (",
           "a segment is deleted while the transaction that stopped naming it can still be undone"),
    # ---- compact.py
    Mutant("compact-no-sync", COMPACT, "    backend.sync()\n    backend.publish", "    backend.publish",
           "compaction repoints the index to copies that were never synced"),
    Mutant("compact-no-ends-commit", COMPACT, "        index.apply([], \"keep-first\", ends, sealed)  # committed ends first",
           "        pass  # committed ends first", "the copies lie beyond their segment's committed end: recovery cuts them"),
    Mutant("compact-delete-before-switch", COMPACT,
           "    report.records_moved += index.move_copies(backend.name, rec.name, moves)\n",
           "    backend.remove_segment(rec.name)\n"
           "    report.records_moved += index.move_copies(backend.name, rec.name, moves)\n",
           "the old segment is deleted before the index stops naming it"),
]


def make_tree(dest: Path, working: bool) -> None:
    """The committed tree (HEAD) by default: the checkout may hold someone's half-done edits."""
    if not working:
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD", *COPIED], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".mypy_cache"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_mutant(mutant: Mutant | None, python: str, timeout: float, working: bool) -> tuple[str, str, float]:
    name = mutant.name if mutant else "(unmutated)"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        tree = Path(tmp)
        make_tree(tree, working)
        if mutant is not None:
            target = tree / mutant.path
            text = target.read_text()
            if text.count(mutant.old) != 1:
                return name, f"BROKEN (pattern found {text.count(mutant.old)} times)", 0.0
            target.write_text(text.replace(mutant.old, mutant.new))
        # The copy's appliance/ must shadow the editable install of the checkout.
        where = subprocess.run([python, "-c", "import appliance; print(appliance.__file__)"], cwd=tree,
                               capture_output=True, text=True)
        if not where.stdout.startswith(str(tree)):
            return name, f"BROKEN (imports {where.stdout.strip() or where.stderr[-200:]})", 0.0
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not slow",
               "--timeout", "60", *[g for g in GUARDS if (tree / g).exists()]]
        try:
            result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return name, "KILLED (timeout: a test hung)", time.monotonic() - started
        elapsed = time.monotonic() - started
        if result.returncode == 0:
            return name, "SURVIVED", elapsed
        failed = [line.split(" ", 1)[1].split(" - ")[0] for line in result.stdout.splitlines()
                  if line.startswith(("FAILED tests", "ERROR tests"))]
        return name, f"KILLED by {failed[0] if failed else 'exit ' + str(result.returncode)}", elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--working-tree", action="store_true", help="mutate a copy of the checkout's files, "
                        "uncommitted edits included, instead of HEAD")
    args = parser.parse_args()
    python = str(ROOT / ".venv/bin/python")
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:40} {m.path}: {m.why}")
        return 0
    baseline = run_mutant(None, python, args.timeout, args.working_tree)
    print(f"{baseline[0]:40} {baseline[1]:70} {baseline[2]:5.1f}s", flush=True)
    if baseline[1] != "SURVIVED":
        print("the unmutated tree fails its tests: fix that first", file=sys.stderr)
        return 2
    survivors, broken = [], []
    with ThreadPoolExecutor(args.jobs) as pool:
        for (name, verdict, elapsed), m in zip(pool.map(lambda m: run_mutant(m, python, args.timeout, args.working_tree), mutants),
                                               mutants, strict=True):
            print(f"{name:40} {verdict:70} {elapsed:5.1f}s", flush=True)
            if verdict == "SURVIVED":
                survivors.append(m)
            elif verdict.startswith("BROKEN"):
                broken.append(m)  # the code moved under the pattern: it tests nothing until the pattern follows
    killed = len(mutants) - len(survivors) - len(broken)
    print(f"\n{killed}/{len(mutants)} killed; survivors: {', '.join(m.name for m in survivors) or 'none'}; "
          f"broken patterns: {', '.join(m.name for m in broken) or 'none'}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
