"""The order ``make test`` hands the test files to its workers: the longest first.

``--dist loadfile`` gives each worker whole files, the next one as it runs out; xdist would
order them by their number of tests, which puts the files of a few long jobs last, and one
worker then runs them alone at the end. Longest first, the workers end together.
"""

from __future__ import annotations

import torch

# One thread per test worker, as every job the tests launch has (tests/helpers.py): 3 workers on 2 cores, and the
# jobs they start, share the cores; torch's default of a thread per core made in-process runs spin against them
# (3.2 s alone, 9.5 s beside two busy processes; 4.9 s with one thread).
torch.set_num_threads(1)

# Seconds of a full run on 2 cores with 3 workers (summed ``pytest --durations=0``), longest first; files not
# named follow in their own order. Refresh it when a file's share changes much.
LONGEST_FIRST = [
    "test_faults.py",  # 131
    "test_fsdp.py",  # 124
    "test_launch.py",  # 121
    "test_stream.py",  # 102
    "test_resume.py",  # 100
    "test_bench.py",  # 97
    "test_task.py",  # 90
    "test_run_folder.py",  # 76
    "test_equivalence.py",  # 63
    "test_snapshot.py",  # 55
    "test_docs.py",  # 53
    "test_hf.py",  # 50
    "test_loop.py",  # 45
    "test_cli.py",  # 43
    "test_sampler.py",  # 36
    "test_core.py",  # 29
    "test_trackers.py",  # 18
    "test_fuzz.py",  # 14
    "test_formats.py",  # 7
    "test_tokens.py",  # 6
]


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests as written
