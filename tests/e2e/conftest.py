"""The operator harness (real kopf on kmock's emulator) for end-to-end tests."""

from tests.operator.conftest import cluster, kmock_options, operator  # noqa: F401
