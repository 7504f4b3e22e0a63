"""Prune a causal language model inside a Jupyter notebook and see, honestly measured, what it does.

``%load_ext jupyter_sparsify`` registers the ``%sparsify`` magics; everything they do is also
plain Python::

    from jupyter_sparsify import Session, load_model
    model, tokenizer = load_model()          # the embedded SmolLM2-135M-Instruct, offline
    session = Session(model, tokenizer)
    session.apply(0.3, mode="csr")
    session.measure()
"""

from .formats import CSRLinear
from .models import load_model
from .session import PruneSettings, Session, forget_session, session_for

__all__ = [
    "CSRLinear",
    "PruneSettings",
    "Session",
    "forget_session",
    "load_model",
    "session_for",
    "load_ipython_extension",
    "unload_ipython_extension",
]
__version__ = "0.2.0.dev0"  # the one place the version is written (pyproject.toml reads it)


def load_ipython_extension(ipython) -> None:
    """``%load_ext jupyter_sparsify``: register the magics and inline Bokeh (no CDN, no banner)."""
    from .magics import register

    register(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext jupyter_sparsify``: remove the magics."""
    from .magics import unregister

    unregister(ipython)
