import os

import pytest
import torch

# Tests are CPU-only and deterministic; keep BLAS from oversubscribing the 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _prompt_cache(tmp_path_factory):
    """Cached prompt embeddings go to a folder of this session, never to the user's ~/.cache."""
    os.environ["HUNYUAN_I2V_PROMPT_CACHE"] = str(tmp_path_factory.mktemp("prompt-cache"))
