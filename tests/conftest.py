"""Jittor is set up once (CPU, oneDNN) before any test module imports it; data go to a temporary folder."""

import os
from pathlib import Path

import pytest

from ccnet import runtime

ROOT = Path(__file__).resolve().parents[1]

runtime.setup("cpu")


@pytest.fixture(scope="session", autouse=True)
def data_home(tmp_path_factory):
    """The embedded data set is generated once per test session into a temporary folder."""
    path = tmp_path_factory.mktemp("ccnet-data")
    os.environ["CCNET_DATA"] = str(path)
    return path


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the config run.py would see (Hydra's compose API, real conf/ folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ccnet.config import register_configs

    register_configs()

    def _compose(overrides=()):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


# a small CCNet trained 2 iterations on the context data set: visualize's and explore's tests share one run
CONTEXT_TINY = [
    "experiment=tiny",
    "dataset=context",
    "schedule.iters=2",
    "schedule.crop_size=[32,256]",
    "backbone.head_channels=16",
]


@pytest.fixture(scope="session")
def trained(compose, tmp_path_factory):
    """The run folder of CONTEXT_TINY, trained once per test session."""
    from ccnet.registry import JOBS

    run_dir = tmp_path_factory.mktemp("context-run")
    JOBS.get("train").factory(compose(CONTEXT_TINY), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def torch_worker():
    """call(fn, *args) runs a tests/torch_twins.py function in one spawned process that has torch and not
    Jittor (the two crash together in one process); the test is skipped where torch is not installed."""
    import importlib.util
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch (the independent reference) is not installed")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:

        def call(fn, *args, **kwargs):
            return pool.submit(fn, *args, **kwargs).result()

        yield call
