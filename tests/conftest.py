"""Shared fixtures: the real embedded model, and small random models of four architectures."""

from __future__ import annotations

import pytest

from jupyter_sparsify.models import load_model

from helpers import word_tokenizer


@pytest.fixture(scope="session")
def shell():
    """A real IPython shell (the one global test instance) with the extension loaded."""
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "jupyter_sparsify")
    yield ip
    ip.run_line_magic("unload_ext", "jupyter_sparsify")


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct and its tokenizer, loaded once."""
    return load_model()


@pytest.fixture(scope="session")
def embedded_session(embedded):
    """One Session over the embedded model for the whole test run (each test resets it)."""
    from jupyter_sparsify.session import session_for

    model, tok = embedded
    return session_for(model, tok)


@pytest.fixture
def smol(embedded_session):
    """The embedded model's session, dense at the start and reset at the end of the test."""
    embedded_session.reset()
    yield embedded_session
    embedded_session.reset()
