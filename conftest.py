"""Options for checking that test_zigma.py holds from any random state and in any order:

    pytest test_zigma.py --reseed 3 --reverse    # torch.manual_seed(3) before every test, tests in reverse order

and for running the tests that take a `device` on another one (bench.py --gpu-check does):

    pytest test_zigma.py --device cuda
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--reseed", type=int, metavar="SEED", help="seed torch's global generator with SEED before every test")
    parser.addoption("--reverse", action="store_true", help="run the tests in reverse order")
    parser.addoption("--device", default="cpu", help="where the tests that take a device run (default: cpu)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(autouse=True)
def reseed_before_each_test(request):
    seed = request.config.getoption("--reseed")
    if seed is not None:
        torch.manual_seed(seed)


@pytest.fixture
def device(request) -> torch.device:
    """The device of --device: the tests that take it run there, the others on the CPU."""
    return torch.device(request.config.getoption("--device"))
