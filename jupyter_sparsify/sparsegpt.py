"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with second-order weight compensation.

The layer's calibration inputs enter only through its Hessian ``H ∝ X Xᵀ`` (``X`` = inputs as
columns, padding removed). :class:`~jupyter_sparsify.input_stats.HessianAccumulator` gives
``H = (1/N) Σ x xᵀ`` over the N calibration tokens; the paper's ``2 X Xᵀ`` differs by a positive factor,
and any positive factor gives exactly the same result because the dampening is relative to ``mean(diag H)``.

Simplifications and choices, relative to the paper's reference code:

* Exact counts. With ``scope="layer"`` (the paper's mask selection) each block of columns is
  pruned with one threshold on the saliency ``w² / d²`` over all its rows, so rows end up with
  different counts; the block's quota is its cumulative share of the layer's
  :func:`~jupyter_sparsify.masks.prune_count` ``(out * in)``, so the layer loses exactly that
  many. ``scope="row"`` (the default) chooses the mask per row, so every row loses exactly
  ``prune_count(in)``.
* Dead inputs (``H_jj == 0``: never nonzero on the calibration data) keep their weight and get
  saliency 0, so they are pruned first within their block's quota instead of being zeroed on top
  of it; no compensation flows through them.
* The Hessian inverse is computed in float64, the column sweep in float32.

One addition (``refit_steps``, on by default): the sweep compensates each pruned weight once,
greedily, in column order, so once the mask is final the kept weights are not yet the best
ones for it. They are refitted to the least-squares optimum of ``‖(W − Ŵ) X‖²`` per row (the
mask fixed, the same dampened Hessian) by conjugate gradient started from the sweep's result.
What it gains on the embedded model is in ``docs/benchmarks.md``; ``refit_steps=0`` gives the paper's
result.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from .masks import check_nm, keep_all_but_lowest, keep_top, prune_count

SUB_BLOCK = 16  # columns updated one by one inside a block; the rest of the block gets one product per sub-block


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    scope: str = "row",
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit_steps: int = 10,
) -> Tensor:
    """Return a pruned copy of ``weight`` ``[out, in]`` with the other weights compensated.

    Args:
        weight: the layer weight in ``nn.Linear`` orientation; it is not modified.
        hessian: ``[in, in]``, any positive multiple of ``Σ x xᵀ`` (see module docstring).
        sparsity: fraction pruned, unstructured; ignored when ``nm`` is given.
        nm: ``(n, m)`` to keep ``n`` of every ``m`` consecutive inputs (e.g. ``(2, 4)``).
        scope: ``"row"``: every row loses exactly :func:`prune_count` ``(in, sparsity)``;
            ``"layer"``: the layer loses exactly ``prune_count(out * in, sparsity)``, each block's
            mask chosen by one threshold over all its rows (the paper's choice), so rows differ.
        blocksize: width of the lazy-update blocks (rounded down to a multiple of ``m``).
        percdamp: dampening ``percdamp * mean(diag H)`` added to the diagonal.
        refit_steps: conjugate-gradient steps refitting the kept weights once the mask is
            final (see the module docstring); 0 keeps the sweep's weights.

    Returns:
        A new tensor, same shape, dtype and device as ``weight``.
    """
    if scope not in ("row", "layer"):
        raise ValueError(f"scope must be 'row' or 'layer' for SparseGPT; got {scope!r}")
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian must be [{columns}, {columns}] for this weight; got {list(hessian.shape)}")
    if nm is not None:
        check_nm(columns, *nm)
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    per_row = scope == "row"
    pruned_total = 0 if nm is not None else prune_count(columns * (1 if per_row else weight.shape[0]), sparsity)
    if nm is None and pruned_total == 0:
        return weight.clone()
    damped, hinv, dead = _inverse_hessian_factor(hessian.to(weight.device), percdamp)
    w = weight.detach().float().t().contiguous().t()  # column-major: each input column is contiguous
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        quota = _share(pruned_total, columns, end) - _share(pruned_total, columns, start)
        with _single_thread():  # the column sweep is many tiny ops: thread start-up would dominate
            errors = _prune_block(w, hinv, dead, start, end, quota, nm, per_row)
        w[:, end:] -= errors @ hinv[start:end, end:]
    if refit_steps:
        w = refit_kept_weights(weight, w, damped, refit_steps)
    return w.contiguous().to(weight.dtype)


def refit_kept_weights(weight: Tensor, pruned: Tensor, hessian: Tensor, steps: int) -> Tensor:
    """Move ``pruned``'s nonzeros toward the least-squares fit of ``weight`` on the inputs.

    Minimises ``(w − ŵ) H (w − ŵ)ᵀ`` for every row at once over the nonzeros of ``pruned``
    (its zeros stay zero) with ``steps`` of conjugate gradient from ``pruned``; ``hessian``
    must be positive definite (dampened). Returns a float32 tensor of ``weight``'s shape.
    """
    h = hessian.float()
    keep = (pruned != 0).float()
    fitted = pruned.float() * keep
    residual = ((weight.float() - fitted) @ h) * keep  # minus the gradient, on the kept weights only
    direction = residual.clone()
    energy = residual.square().sum(dim=1, keepdim=True)
    tiny = torch.finfo(h.dtype).tiny  # rows already at the optimum divide 0 by this, not by 0
    for _ in range(steps):
        curved = (direction @ h) * keep
        step = energy / (direction * curved).sum(dim=1, keepdim=True).clamp_min(tiny)
        fitted += step * direction
        residual -= step * curved
        new_energy = residual.square().sum(dim=1, keepdim=True)
        direction = residual + new_energy / energy.clamp_min(tiny) * direction
        energy = new_energy
    return fitted


@contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dampened_hessian(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor, Tensor]:
    """``H + damp I`` in float64, its lower Cholesky factor, and the dead-input mask (``H_jj == 0``).

    Dead inputs get diagonal 1 first; ``damp`` starts at ``percdamp * mean(diag H)`` over the live
    inputs and grows tenfold while rounding leaves the matrix not positive definite.
    """
    h = hessian.detach().double().clone()
    diag = h.diagonal()
    dead = diag == 0
    if bool(dead.all()):
        raise ValueError("The Hessian is all zero: no calibration token reached this layer")
    damp = percdamp * diag[~dead].mean()
    diag[dead] = 1.0
    for _ in range(6):
        damped = h + damp * torch.eye(len(h), dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return damped, factor, dead
        damp = damp * 10
    raise ValueError("The Hessian is not positive definite even after dampening")


def _inverse_hessian_factor(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor, Tensor]:
    """The dampened ``H + damp I`` (float64), the upper Cholesky factor of its inverse
    (float32) and the dead-input mask."""
    damped, factor, dead = dampened_hessian(hessian, percdamp)
    identity = torch.eye(len(damped), dtype=damped.dtype, device=damped.device)
    inverse_factor = torch.linalg.solve_triangular(factor, identity, upper=False)
    hinv = torch.linalg.cholesky(
        inverse_factor.T @ inverse_factor, upper=True
    )  # cholesky_inverse is ~15x slower on CPU
    return damped, hinv.float(), dead


def _share(total: int, columns: int, boundary: int) -> int:
    """Of ``total`` pruned weights, those in columns ``[0, boundary)``: cumulative rounding, exact at the end."""
    return (2 * total * boundary + columns) // (2 * columns)


def _prune_block(
    w: Tensor,
    hinv: Tensor,
    dead: Tensor,
    start: int,
    end: int,
    quota: int,
    nm: tuple[int, int] | None,
    per_row: bool,
) -> Tensor:
    """Prune columns ``[start, end)`` of ``w`` in place with OBS updates; return the scaled errors.

    ``quota`` weights are pruned per row (``per_row``) or in the whole block (one threshold). The
    columns are swept in sub-blocks of :data:`SUB_BLOCK`: each column's update reaches the rest of its
    sub-block at once and the rest of the block with one product per sub-block (the paper's lazy
    batch update, one level further down), the same result up to rounding with far less memory traffic.
    """
    block, hinv_block, dead = w[:, start:end], hinv[start:end, start:end], dead[start:end]
    d = hinv_block.diagonal()
    errors = torch.zeros_like(block)  # column-major like ``block``
    prune = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
    if nm is None and per_row:
        prune = ~keep_top(_saliency(block, d, dead), block.shape[1] - quota)
    elif nm is None:
        prune = ~keep_all_but_lowest(_saliency(block, d, dead), quota)
    width = block.shape[1]
    step = SUB_BLOCK if nm is None else max(nm[1], SUB_BLOCK // nm[1] * nm[1])
    for first in range(0, width, step):
        last = min(first + step, width)
        for i in range(first, last):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                prune[:, group] = ~keep_top(_saliency(block[:, group], d[group], dead[group]), nm[0])
            kept = block[:, i].masked_fill(prune[:, i], 0.0)
            errors[:, i] = (block[:, i] - kept) / d[i]
            block[:, i:last] -= errors[:, i : i + 1] * hinv_block[i : i + 1, i:last]
            block[:, i] = kept
        block[:, last:] -= errors[:, first:last] @ hinv_block[first:last, last:]
    return errors


def _saliency(block: Tensor, d: Tensor, dead: Tensor) -> Tensor:
    """OBS saliency ``w² / d²`` (``d``: diagonal of the Cholesky factor); dead inputs cost 0."""
    return (block.square() / d.square()).masked_fill(dead, 0.0)
