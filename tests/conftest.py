"""Shared fixtures. The shared helpers live in modules beside the tests, never in test_*.py files:
train_utils (train-script runs: SMALL, REDUCED, run_train), checkpoint_runs (the micro preset's
runs a test can kill), sweep_utils (the sweep launcher), runlog_fixtures (run logs to read),
optim_reference, fork_reference / fork_model_reference (../shared, skipped without it)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The project is importable where `make venv` installed it (pip install -e .). A clone tested
# without that install: pytest's rootdir gives this process the repository, and PYTHONPATH gives
# it to the scripts the tests start (python bench/x.py, torchrun train_gpt.py, ...).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny matrices: one torch thread is faster, and far faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory) -> Path:
    """Small train/val shards of GPT-2 tokens from the standard library's sources."""
    from train_utils import make_small_shards

    return make_small_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def local_corpus() -> Path:
    """The default shards (data/local, what `make demo` trains on), for the tests that run the
    trainer with its default paths (they opt in: `pytestmark = pytest.mark.usefixtures("local_corpus")`).
    Built once per session from the stdlib (seconds); a no-op when up to date."""
    from data.prepare_corpus import prepare_corpus

    return Path(prepare_corpus(out_dir=ROOT / "data" / "local", progress=False)["out_dir"])
