"""Options for checking that test_zigma.py holds from any random state and in any order:

    pytest test_zigma.py --reseed 3 --reverse    # torch.manual_seed(3) before every test, tests in reverse order

and for running the tests that take a `device` on another one, all of the suite or only those (marked `device`
on collection; bench.py --gpu-check runs only those):

    pytest test_zigma.py --device cuda
    pytest test_zigma.py --device cuda -m device
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--reseed", type=int, metavar="SEED", help="seed torch's global generator with SEED before every test")
    parser.addoption("--reverse", action="store_true", help="run the tests in reverse order")
    parser.addoption("--device", default="cpu", help="where the tests that take a device run (default: cpu)")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: the test takes the `device` fixture (marked on collection, not by hand)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
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
