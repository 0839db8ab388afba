from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n_gpus == 0:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model, converted once into the llmopt cache (skips if the package is absent)."""
    from llmopt.errors import UserError
    from llmopt.loading.resolve import DEFAULT_MODEL, resolve_model

    try:
        return str(resolve_model(DEFAULT_MODEL, progress=False))
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny matmuls: on a shared 2-core runner it beats two by
    a wide margin (OpenMP spin-waits). Modules opt in with ``pytestmark``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
