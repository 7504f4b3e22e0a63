"""Calibration: run text through a model and collect, per layer, the statistics of its inputs.

Two routes:

* :func:`collect_input_stats` (one-shot): every statistic comes from the *dense* model. Wanda's
  norms take one forward pass; SparseGPT's Hessians take one pass per group of ``group_size``
  modules, so peak memory is bounded by the group's ``[in, in]`` matrices.
* :func:`collect_sequential` (the SparseGPT paper's variant): transformer blocks are visited in
  order, and block *i*'s statistics are taken on the outputs of blocks ``< i`` *after* a callback
  has pruned them, so later layers compensate for the errors of earlier ones.

Padding never counts: texts are right-padded and only positions with attention mask 1 are used.
The model's weights are never changed (except by the callback of :func:`collect_sequential`, and by
its block reconstruction when asked for).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from .corpus import Batch, padded_batches
from .experts import routed_positions
from .input_stats import HessianAccumulator, HessianAndNormAccumulator, InputNormAccumulator
from .models import context_limit, model_device, model_dtype
from .progress import Progress
from .reconstruction import block_output, reconstruct_block

Stat = Literal["norms", "hessians"]


def in_features(module: nn.Module) -> int:
    """Input width of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0]
    raise TypeError(f"Only nn.Linear and Conv1D layers can be calibrated; got {type(module).__name__}")


def collect_input_stats(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    modules: list[tuple[str, nn.Module]],
    *,
    want: Stat = "norms",
    max_length: int = 256,
    batch_size: int = 8,
    group_size: int | None = None,
    progress: Progress | None = None,
    norms: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Input statistics of ``modules`` on ``texts``, all from the dense model.

    Args:
        model: a causal LM (its weights are not changed).
        tokenizer: its tokenizer; each text is truncated to ``max_length`` tokens.
        texts: calibration documents (e.g. :func:`default_calibration_texts`).
        modules: ``(qualified name, module)`` pairs of ``nn.Linear`` / ``Conv1D`` layers.
        want: ``"norms"``: ``||X_j||_2`` per input column (float32 ``[in]``, for Wanda);
            ``"hessians"``: ``(1/N) Σ x xᵀ`` over the N tokens (float32 ``[in, in]``, for SparseGPT).
        batch_size: texts per forward pass.
        group_size: with ``"hessians"``, at most this many modules per pass (``None``: all in
            one pass). Memory ≈ ``group_size * in² * 4`` bytes; passes = ``ceil(len/group_size)``,
            each stopping as soon as its last module has run.
        progress: called as ``progress(done, total, message)`` after each batch.
        norms: with ``"hessians"``, a dict to fill with the same modules' input norms from the same pass (what a
            ``"norms"`` pass would give, bit for bit).

    Returns:
        ``{name: statistic}`` on each module's device.
    """
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be at least 1 (or None for one pass); got {group_size}")
    if norms is not None and want != "hessians":
        raise ValueError(f"norms= collects the input norms beside the Hessians: it needs want='hessians', not {want!r}")
    batches = _batches(tokenizer, texts, context_limit(model, max_length), batch_size, model_device(model))
    size = max(1, len(modules) if want == "norms" or group_size is None else group_size)
    groups = [modules[i : i + size] for i in range(0, len(modules), size)]
    stats: dict[str, Tensor] = {}
    for number, group in enumerate(groups):
        accumulators = _accumulators(group, want, with_norms=norms is not None)
        tick = _progress_step(progress, number * len(batches), len(groups) * len(batches), number, len(groups))
        same_input = _run_model(model, batches, group, accumulators, tick)
        owners = {name: same_input.get(name, name) for name in accumulators}  # one tensor when the input is shared
        results = {name: accumulators[name].result() for name in set(owners.values())}
        stats.update({name: results[owner] for name, owner in owners.items()})
        if norms is not None:
            found = {name: accumulators[name].norms.result() for name in set(owners.values())}
            norms.update({name: found[owner] for name, owner in owners.items()})
    return stats


def collect_sequential(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    blocks: Sequence[nn.Module],
    modules: list[tuple[str, nn.Module]],
    on_block: Callable[[int, dict[str, Tensor]], None],
    *,
    want: Stat = "hessians",
    reconstruct: bool = False,
    max_length: int = 256,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> None:
    """Sequential calibration, block by block, as in the SparseGPT paper.

    The inputs of ``blocks[0]`` are captured once; then for each block ``i`` the statistics of
    its ``modules`` are collected by running that block alone, ``on_block(i, stats)`` is called
    (it may prune the block in place), and the block is run again to produce the inputs of block
    ``i + 1``. Memory: the hidden states of all calibration tokens (``tokens * hidden * 4`` B)
    plus one block's statistics. Cost: about two dense forward passes.

    Args:
        blocks: the transformer blocks in execution order (see :func:`decoder_blocks`).
        modules: the linear layers to calibrate; each must sit inside one of ``blocks``.
        on_block: ``on_block(block_index, {name: statistic})``, called once per block.
        reconstruct: after ``on_block``, tune the block's kept weights to reproduce the block
            as it was before (:func:`~jupyter_sparsify.reconstruction.reconstruct_block`; a
            copy of one block in memory, about three more passes per epoch).
        Others: as in :func:`collect_input_stats`.
    """
    owner = _owners(blocks, modules)
    inputs, masks = block_inputs(model, tokenizer, texts, blocks[0], max_length=max_length, batch_size=batch_size)
    with _eval_mode(model), torch.no_grad():
        for index, block in enumerate(blocks):
            group = [(name, module) for name, module in modules if owner[name] == index]
            accumulators = _accumulators(group, want)
            state: dict = {"same_input": {}}
            with _hooks(group, accumulators, state):
                for (args, kwargs), attention in zip(inputs, masks):
                    state["mask"], state["previous"] = attention, None
                    block(*args, **kwargs)
            same_input = state["same_input"]
            dense = copy.deepcopy(block) if reconstruct and group else None
            on_block(index, {name: accumulators[same_input.get(name, name)].result() for name in accumulators})
            if dense is not None:
                reconstruct_block(block, dense, inputs, masks, [module.weight for _, module in group])
                del dense
            inputs = [_next_inputs(block, args, kwargs) for args, kwargs in inputs]
            if progress is not None:
                progress(index + 1, len(blocks), f"calibrating block {index + 1}/{len(blocks)}")


def block_inputs(
    model: nn.Module, tokenizer, texts: list[str], block: nn.Module, *, max_length: int = 256, batch_size: int = 8
) -> tuple[list[tuple[tuple, dict]], list[Tensor]]:
    """What ``texts`` feed ``block`` (a transformer block; the forward stops there): per batch the block's
    ``(args, kwargs)``, and the batch's attention mask."""
    batches = _batches(tokenizer, texts, context_limit(model, max_length), batch_size, model_device(model))
    with _eval_mode(model), torch.no_grad():
        return _capture_inputs(model, block, batches), [mask for _, mask in batches]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM: its longest ``nn.ModuleList``."""
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise ValueError(f"No nn.ModuleList of transformer blocks found in {type(model).__name__}")
    return max(lists, key=len)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


def _batches(tokenizer, texts: list[str], max_length: int, batch_size: int, device: torch.device) -> list[Batch]:
    """Tokenize, drop empty texts, and right-pad into ``(input_ids, attention_mask)`` batches on ``device``."""
    batches = padded_batches(tokenizer, texts, max_length=max_length, max_batch=batch_size)
    if not batches:
        raise ValueError("The calibration texts are empty: nothing to calibrate on")
    return [(ids.to(device), mask.to(device)) for ids, mask in batches]


def _accumulators(
    group: list[tuple[str, nn.Module]], want: Stat, with_norms: bool = False
) -> dict[str, InputNormAccumulator | HessianAccumulator | HessianAndNormAccumulator]:
    if want not in ("norms", "hessians"):
        raise ValueError(f"want must be 'norms' or 'hessians'; got {want!r}")
    if want == "norms":
        kind = InputNormAccumulator
    else:
        kind = HessianAndNormAccumulator if with_norms else HessianAccumulator
    return {name: kind(in_features(module), device=module.weight.device) for name, module in group}


def _run_model(
    model: nn.Module, batches: list[Batch], group, accumulators, tick: Callable[[int], None]
) -> dict[str, str]:
    """Forward every batch with hooks on ``group``, stopping each pass once all have run.

    Returns ``{name: other}`` for modules that were fed the very same input tensor as an
    earlier one (e.g. q/k/v projections): their statistic is the other's, computed once.
    """
    state: dict = {"same_input": {}}
    with _eval_mode(model), torch.no_grad(), _hooks(group, accumulators, state, stop_when_done=True):
        for done, (ids, attention) in enumerate(batches, start=1):
            state["mask"] = attention
            state["seen"] = set()
            state["previous"] = None
            try:
                model(input_ids=ids, attention_mask=attention, use_cache=False)
            except _StopForward:
                pass
            tick(done)
    return state["same_input"]


@contextmanager
def _hooks(group, accumulators, state: dict, stop_when_done: bool = False) -> Iterator[None]:
    """Forward pre-hooks feeding each module's input to its accumulator; always removed.

    ``state["mask"]`` is the current batch's attention mask. With ``stop_when_done``, the names
    seen are gathered in ``state["seen"]`` and the pass stops once every module has run (this
    assumes each module runs once per forward, as in the transformer blocks of causal LMs).
    """

    def make_hook(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            previous = state.get("previous")
            if "same_input" in state and previous is not None and previous[0] is x:
                state["same_input"][name] = previous[1]  # fed the same tensor as the module before: counted once
            else:
                accumulators[name].add_batch(x, _mask_of_rows(module, state["mask"]))
                state["previous"] = (x, name)
            if stop_when_done:
                state["seen"].add(name)
                if len(state["seen"]) == len(accumulators):
                    raise _StopForward

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, module in group]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mask_of_rows(module: nn.Module, mask: Tensor | None) -> Tensor | None:
    """The attention mask for a module's input rows: the batch's, or for an MoE expert layer (which sees only the
    positions routed to it) the batch's at those positions, so that padding routed to an expert never counts."""
    positions = routed_positions(module)
    return mask.reshape(-1)[positions.to(mask.device)] if positions is not None and mask is not None else mask


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode (no dropout) and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _capture_inputs(model: nn.Module, first: nn.Module, batches: list[Batch]) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` each batch passes to the first block (the forward stops there)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, attention in batches:
            try:
                model(input_ids=ids, attention_mask=attention, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _next_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run one block and put its output hidden states where its input hidden states were."""
    hidden = block_output(block, (args, kwargs))
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _owners(blocks: Sequence[nn.Module], modules: list[tuple[str, nn.Module]]) -> dict[str, int]:
    """Index of the block holding each module; ``ValueError`` for modules outside all blocks."""
    index_of = {id(sub): i for i, block in enumerate(blocks) for sub in block.modules()}
    outside = [name for name, module in modules if id(module) not in index_of]
    if outside:
        raise ValueError(
            f"sequential calibration covers only the layers inside the transformer blocks, and {outside} are "
            "outside them: calibrate with calibration='once' (--calibration once), or leave them out (exclude=...)"
        )
    return {name: index_of[id(module)] for name, module in modules}


def _progress_step(
    progress: Progress | None, offset: int, total: int, group: int, groups: int
) -> Callable[[int], None]:
    """Per-batch progress callback for one pass (a no-op without ``progress``)."""
    message = "calibrating" if groups == 1 else f"calibrating (pass {group + 1}/{groups})"
    return (lambda done: progress(offset + done, total, message)) if progress else (lambda done: None)


class Calibrator:
    """Calibration of one model on one set of texts, as the criteria use it.

    ``norms`` and ``hessians`` come from the *dense* model in one pass and are kept (the
    ``calibration="once"`` path): later calls for the same modules cost nothing. They are dropped
    when the model's dtype changes; a new set of texts gets a new ``Calibrator``. ``sequential``
    runs the papers' block-by-block pass each time, as it depends on what earlier blocks were
    pruned to.
    """

    def __init__(self, model: nn.Module, tokenizer, texts: list[str]) -> None:
        self.model, self.tokenizer, self.texts = model, tokenizer, texts
        self._cache: dict[Stat, dict[str, Tensor]] = {"norms": {}, "hessians": {}}
        self._dtype: torch.dtype | None = None

    def norms(self, modules: list[tuple[str, nn.Module]], progress: Progress | None = None) -> dict[str, Tensor]:
        """Wanda's input norms of ``modules`` on the dense model (the caller makes the model dense)."""
        return self._once(modules, "norms", progress)

    def hessians(self, modules: list[tuple[str, nn.Module]], progress: Progress | None = None) -> dict[str, Tensor]:
        """SparseGPT / ADMM Hessians of ``modules`` on the dense model, all in one pass; modules that
        share an input (q/k/v, gate/up) share one tensor."""
        return self._once(modules, "hessians", progress)

    def hessian_bytes(self, modules: list[tuple[str, nn.Module]]) -> int:
        """Upper bound on the memory :meth:`hessians` would add (float32 ``in x in`` per distinct input width
        and block; modules that share an input are counted once each, so this over-counts them)."""
        missing = [module for name, module in modules if name not in self._cache["hessians"]]
        return sum(in_features(module) ** 2 * 4 for module in missing)

    def cached(self, want: Stat, name: str) -> Tensor | None:
        """The statistic already collected for one layer (``None`` if not yet): nothing is computed."""
        return self._cache[want].get(name) if model_dtype(self.model) == self._dtype else None

    @property
    def nbytes(self) -> int:
        """Memory held by the cached statistics (a tensor shared by several modules counted once)."""
        tensors = {id(t): t for stats in self._cache.values() for t in stats.values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def _once(self, modules: list[tuple[str, nn.Module]], want: Stat, progress: Progress | None) -> dict[str, Tensor]:
        dtype = model_dtype(self.model)
        if dtype != self._dtype:
            self._cache, self._dtype = {"norms": {}, "hessians": {}}, dtype
        cache = self._cache[want]
        missing = [(name, module) for name, module in modules if name not in cache]
        if missing:
            what = "input norms" if want == "norms" else "Hessians"
            note = f"calibrating once: {what} on {len(self.texts)} texts, kept for every later apply"
            tell = (lambda done, total, _: progress(done, total, note)) if progress is not None else None
            norms: dict[str, Tensor] | None = {} if want == "hessians" else None
            cache.update(
                collect_input_stats(
                    self.model, self.tokenizer, self.texts, missing, want=want, progress=tell, norms=norms
                )
            )
            for name, norm in (norms or {}).items():  # Wanda needs no pass of its own after this one
                self._cache["norms"].setdefault(name, norm)
        return {name: cache[name] for name, _ in modules}

    def sequential(
        self,
        modules: list[tuple[str, nn.Module]],
        want: Stat,
        on_block: Callable[[int, dict[str, Tensor]], None],
        progress: Progress | None = None,
        reconstruct: bool = False,
    ) -> None:
        """Block by block: statistics of each block's ``modules`` on the already pruned earlier blocks."""
        collect_sequential(
            self.model,
            self.tokenizer,
            self.texts,
            decoder_blocks(self.model),
            modules,
            on_block,
            want=want,
            reconstruct=reconstruct,
            progress=progress,
        )
