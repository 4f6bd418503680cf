"""Puts the repository root on sys.path so tests can `import ddpm`, and runs torch with one thread."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny CPU models gain nothing from threads, and on a busy 2-core machine threads spin; one
    thread also keeps in-process and subprocess (OMP_NUM_THREADS=1) results bitwise comparable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
