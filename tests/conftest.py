"""Shared test settings."""

import pytest
import torch

# The tests are dominated by many small tensor operations, for which torch's intra-op thread
# pool only adds synchronisation; on a loaded 2-core machine two threads made single small
# backward passes ~30x slower (measured 45 ms vs 1.4 ms). One thread keeps the suite fast and
# its timings repeatable.
torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype, restoring the previous default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _never_in_the_working_directory(tmp_path, monkeypatch):
    """Run every test in its own empty directory.

    Tests never read from or write into the checkout: a relative path (the command line's
    default ``--out deqppl-out``, say) lands in the test's ``tmp_path``, so a run of the README's
    main command in the checkout cannot change what a test sees, and no test leaves files behind.
    """
    monkeypatch.chdir(tmp_path)
