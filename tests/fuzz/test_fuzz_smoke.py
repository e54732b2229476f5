"""The network fuzzer (tests/fuzz/fuzzer.py) against a real `appliance serve`: a short seeded run in every
`make test`, a longer one with -m slow (`make fuzz` runs it for minutes with a fresh seed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ServerHandle
from tests.fuzz import fuzzer


def run(make_server: Callable[..., ServerHandle], tmp_path: Path, seed: int, cases: int, seconds: float,
        first: int = 0) -> fuzzer.Report:
    server = make_server(server=fuzzer.FUZZ_SERVER, storage=fuzzer.FUZZ_STORAGE)
    target, corpus = fuzzer.prepare(server, tmp_path)
    assert {"pynetdicom", "storescu", "echoscu"} <= set(corpus)
    report = fuzzer.fuzz(target, corpus, seed, cases, seconds, tmp_path / "failures", first=first)
    assert not report.failures, "\n".join(
        f"case {number}: {'; '.join(problems)}\n  replay: python -m tests.fuzz.fuzzer --replay {saved}"
        for number, problems, saved in report.failures) + "\n" + server.log()[-3000:]
    return report


def test_fuzz_smoke(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    report = run(make_server, tmp_path, seed=1, cases=100, seconds=50)
    assert report.cases >= 50, report.summary()  # the time bound cut the run short: the server is too slow
    assert report.answers.get("ABORT", 0) and report.answers.get("AC", 0) and report.stored, report.summary()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_long(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    run(make_server, tmp_path, seed=2, cases=3000, seconds=600)


def test_a_case_is_a_function_of_seed_and_number() -> None:
    corpus = {"a": bytes.fromhex("0100000000100002") + bytes(14), "b": fuzzer.HEADER.pack(4, 6) + bytes(6)}
    one, two = fuzzer.make_case(5, 17, corpus), fuzzer.make_case(5, 17, corpus)
    assert one == two
    assert fuzzer.Case.from_json(one.to_json()) == one
