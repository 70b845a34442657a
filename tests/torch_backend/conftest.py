"""Torch-backend tests: one intra-op thread per test process (tests/conftest.py resets accelerate's state).

The test machines have 2 cores shared by `pytest -n 2` workers (and other jobs); torch's default of one OpenMP
thread per core then makes small ops wait on descheduled threads (an AdamW step of the tiny UNet takes ~1 s
instead of ~15 ms). Subprocesses inherit OMP_NUM_THREADS.
"""

import pytest


@pytest.fixture(autouse=True)
def _torch_test_process(monkeypatch: pytest.MonkeyPatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
