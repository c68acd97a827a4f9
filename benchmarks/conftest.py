import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.addoption("--bench-full", action="store_true", help="all shapes instead of the quick set")
