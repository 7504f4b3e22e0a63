"""One wrapped model: dense reference, in-place reversible pruning, measurements, history."""

from __future__ import annotations

import functools
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import metrics
from .agreement import TokenAgreement, token_agreement
from .corpus import (
    MAX_LENGTH,
    SEED_TEXTS,
    calibration_documents,
    check_next_token_targets,
    default_calibration_texts,
    encode_corpus,
    validate_texts,
)
from .criteria import (
    DENSE,
    PruneSettings,
    default_scope,
    prune_with_criterion,
    pruned_by_magnitude,
    validate_calibration,
    validate_criterion,
)
from .evaluation import check_vocabulary, flat_predictions, run_corpus
from .experts import fuse_experts, unfuse_experts
from .formats import CSRLinear, validate_backend
from .generation import SideBySide, side_by_side
from .latency import measure_against_dense
from .layers import PrunableLayer, head_module_names, linear_layers, select_layers, weight_matrix
from .memory import release_freed_memory
from .models import cache_dir, context_limit, model_device, model_dtype
from .offload import attach_offloaded_weights, restore_offload
from .progress import Progress, silent, tqdm_progress
from .pruning import parse_pattern, validate_amount, validate_scope
from .undo import DenseOriginals, SpillFile, UndoBytes, spill_wanted, validate_undo

MODES = ("dense", "masked", "csr")


@dataclass(frozen=True)
class Measurement:
    """One row of the history: what :meth:`Session.measure` found (the one definition of the history's columns)."""

    setup: str
    mode: str
    criterion: str
    scope: str
    pattern: str
    amount: float
    size_mb: float
    sparsity_prunable: float
    sparsity_model: float
    compute_ratio: float
    executed_ratio: float
    top1_match: float
    perplexity: float
    prefill_ms: float = math.nan
    decode_ms: float = math.nan
    dense_prefill_ms: float = math.nan
    dense_decode_ms: float = math.nan
    prefill_speedup: float = math.nan
    decode_speedup: float = math.nan
    eval_tokens: int = 0


LOW_COVERAGE = 0.9  # a session that can prune less of the model's matmul weights than this warns when it starts
QUIET_BATCHES = 16  # evaluation corpora up to this many batches (128 texts) get no progress bar of their own
HISTORY_COLUMNS = tuple(column.name for column in fields(Measurement))


class SessionBusyError(RuntimeError):
    """Another thread (the panel's worker) is using the session right now."""


def _exclusive(method: Callable) -> Callable:
    """Run ``method`` holding the session (see :meth:`Session._turn`)."""

    @functools.wraps(method)
    def run(self: Session, *args, **kwargs):
        with self._turn():
            return method(self, *args, **kwargs)

    return run


class Session:
    """A causal LM wrapped for in-place, reversible pruning and honest measurement.

    Creating a session runs the dense model once over the evaluation corpus (the reference
    for ``top1_match``) and keeps the dense original of every prunable weight so that any apply
    can start from it and ``reset`` restores it bit-exact: read back from the checkpoint's files
    where the model came from safetensors and is unchanged since, else a copy (``undo``, below);
    ``undo_bytes`` is that cost.

    Args:
        texts: the evaluation corpus (default: the shipped seed texts).
        undo: where the dense original is kept: ``"auto"`` (the checkpoint's files where the weights equal
            them, else RAM, or a spill file in the cache folder when RAM is short), ``"memory"`` (a copy in
            RAM), ``"disk"`` (never in RAM: the checkpoint's files or a spill file); see :mod:`.undo`.

    Example:
        >>> session = Session(model, tokenizer)
        >>> session.apply(0.3, mode="csr")
        >>> session.measure()["size_mb"]
        >>> session.reset()
    """

    def __init__(self, model: nn.Module, tokenizer, texts: Sequence[str] = SEED_TEXTS, *, undo: str = "auto") -> None:
        self._lock = threading.RLock()
        validate_undo(undo)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (e.g. from load_model()); got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer; got {type(tokenizer).__name__}")
        existing = existing_session(model)
        if existing is not None:
            raise ValueError(
                f"this model already has a session, which holds its dense original (the model is now "
                f"{existing.settings.label}): use session_for(model) to reach it, or forget_session(model) to put "
                "the model back to dense and start a new one"
            )
        if any(isinstance(module, CSRLinear) for module in model.modules()):
            raise ValueError(
                "this model already holds CSR layers, so its dense original is unknown: load it again (or reset "
                "the session that pruned it) before starting a session"
            )
        _check_no_torch_prune(model)
        self.model = model
        self.tokenizer = tokenizer
        self._offloaded = attach_offloaded_weights(model)  # accelerate's offloaded weights onto their modules
        self._mixture_of_experts = bool(unfuse_experts(model))  # fused experts: one nn.Linear per matrix (.experts)
        try:
            self._start(texts, undo)
        except BaseException:  # a session that fails to start leaves the model as it found it
            fuse_experts(model)
            restore_offload(self._offloaded)
            raise
        _SESSIONS[id(model)] = self  # one model, one session: the magics and the panel find it

    def _start(self, texts: Sequence[str], undo: str) -> None:
        """Find the prunable layers, keep their dense originals and compute the dense reference."""
        model = self.model
        self._candidates = linear_layers(model)
        self._heads = head_module_names(model)
        self.default_layers = select_layers(self._candidates, self._heads)
        _warn_if_low_coverage(self)
        self._dense_dtype = model_dtype(model)
        self._originals = DenseOriginals(model, undo, cache_dir() / "undo")
        self._snapshot(self.default_layers)
        self._dense_compute = metrics.linear_compute(model)
        self.settings = DENSE
        self._pruned: list[PrunableLayer] = []
        self._rows: list[dict] = []
        self._calibration = None
        self._aside = _SetAside()
        self.set_texts(texts)
        self._record_fingerprints()

    # -- corpus ---------------------------------------------------------------------------

    @_exclusive
    def set_texts(self, texts: Sequence[str], progress: Progress | None = None) -> None:
        """Use ``texts`` as the evaluation corpus from now on (the dense reference is recomputed).

        Args:
            progress: ``progress(done, total, message)`` over the reference pass; default a tqdm bar when the
                corpus is large (more than :data:`QUIET_BATCHES` batches), nothing otherwise.
        """
        cleaned = validate_texts(texts)
        check_next_token_targets(self.tokenizer, cleaned)
        corpus = encode_corpus(self.tokenizer, cleaned, max_length=context_limit(self.model, MAX_LENGTH))
        check_vocabulary(self.model, corpus)
        if progress is None and len(corpus.batches) <= QUIET_BATCHES:
            progress = silent
        with self.dense_view(), tqdm_progress(progress, "dense reference") as report:
            reference = run_corpus(self.model, corpus, report)
        self.texts, self._corpus = cleaned, corpus
        self._reference_predictions, self._reference_mask = flat_predictions(reference)

    @property
    def calibration_texts(self) -> list[str]:
        """Texts the data-aware criteria (Wanda, SparseGPT, ADMM) calibrate on: ``set_calibration_texts``'s, else
        :func:`~jupyter_sparsify.corpus.default_calibration_texts`, or for a mixture-of-experts model all the shipped
        documents (each expert is calibrated on the tokens routed to it, a fraction of them)."""
        chosen = getattr(self, "_calibration_texts", None)
        if chosen:
            return chosen
        return calibration_documents() if self._mixture_of_experts else default_calibration_texts()

    @_exclusive
    def set_calibration_texts(self, texts: Sequence[str]) -> None:
        """Calibrate Wanda / SparseGPT / ADMM on ``texts`` instead of the default (see :attr:`calibration_texts`)."""
        self._calibration_texts = validate_texts(texts)
        self._calibration = None

    def _calibrator(self):
        from .calibration import Calibrator

        if self._calibration is None:
            self._calibration = Calibrator(self.model, self.tokenizer, self.calibration_texts)
        return self._calibration

    # -- pruning --------------------------------------------------------------------------

    @_exclusive
    def apply(
        self,
        amount: float | None = None,
        mode: str = "masked",
        criterion: str = "magnitude",
        scope: str | None = None,
        *,
        pattern: str | tuple[int, int] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        backend: str | None = None,
        reconstruct: bool = False,
        calibration: str | None = None,
        progress: Progress | None = None,
    ) -> PruneSettings:
        """Prune the model in place, starting from the dense original.

        Args:
            amount: fraction of the prunable weights to zero, in [0, 1). With ``pattern`` it
                may be left out (2:4 fixes it at 0.5).
            mode: ``masked`` (zeros in dense tensors, dense kernels), ``csr`` (pruned layers
                replaced by :class:`CSRLinear`) or ``dense`` (same as :meth:`reset`).
            criterion: ``magnitude``, ``wanda``, ``sparsegpt`` or ``admm``.
            scope: ``global`` (one threshold over all layers), ``layer`` (the same fraction in
                every layer) or ``row`` (the same fraction in every output row). SparseGPT and ADMM
                take ``row`` or ``layer``. ``None``: the criterion's own (``global`` for magnitude,
                as in the course notebook; ``row`` for Wanda, SparseGPT and ADMM).
            pattern: ``"2:4"`` / ``"4:8"``: keep N of every M weights along the input dimension.
            include / exclude: glob patterns on layer names (the head is pruned only if named).
            backend: CSR kernels, ``fast`` or ``torch`` (default: fastest available).
            reconstruct: after each block is pruned, tune its kept weights so that it reproduces
                the dense block on the calibration texts (Wanda per row/layer, SparseGPT, ADMM;
                float32 models). Slower (2 more epochs per block), closer to dense. Needs
                ``calibration="sequential"``.
            calibration: for Wanda / SparseGPT / ADMM: ``once`` (statistics of the dense model,
                collected at the first apply and reused by every later one: seconds per apply) or
                ``sequential`` (block by block on the already pruned blocks, as in the papers, at
                every apply: minutes). ``None``: ``sequential`` with ``reconstruct``, else ``once``.
            progress: ``progress(done, total, message)``; default a tqdm bar.

        Returns:
            The validated settings now in force. Bad input raises before anything changes;
            an error or interrupt during the work puts the model back as it was.
        """
        settings = self._validate(
            amount=amount,
            mode=mode,
            criterion=criterion,
            scope=scope,
            pattern=pattern,
            include=include,
            exclude=exclude,
            backend=backend,
            reconstruct=reconstruct,
            calibration=calibration,
        )
        _check_no_torch_prune(self.model)
        self.check_unchanged_outside()
        layers = self._layers_for(settings)
        try:
            with self.undoable():
                self._restore_dense()
                self._prune(settings, layers, progress)
        finally:
            self._record_fingerprints()
            release_freed_memory()
        return settings

    @_exclusive
    def reset(self, discard_changes: bool = False) -> None:
        """Put back the dense original: same module types, ``state_dict`` bit-exact.

        Args:
            discard_changes: also when a prunable weight was changed outside the session since its last
                apply / reset (otherwise that is refused, so that such a change is never lost unnoticed).
        """
        if not discard_changes:
            self.check_unchanged_outside()
        try:
            self._restore_dense()
        finally:
            self._record_fingerprints()
            release_freed_memory()

    def _record_fingerprints(self) -> None:
        """An exact checksum of every prunable weight as the session leaves it (to notice edits from outside)."""
        self._fingerprints = {layer.name: _fingerprint(getattr(layer.parent, layer.attr)) for layer in self._candidates}

    @property
    def pruned_layers(self) -> tuple[PrunableLayer, ...]:
        """The layers the current variant pruned (none while dense)."""
        return tuple(self._pruned)

    @property
    def candidate_layers(self) -> tuple[PrunableLayer, ...]:
        """Every layer the session can prune: :attr:`default_layers` and those only ``include`` selects."""
        return tuple(self._candidates)

    def check_unchanged_outside(self) -> None:
        """Raise ``ValueError`` (saying what to do) if a prunable weight changed since the session last set it: apply
        and reset would overwrite it, measure would label it wrongly."""
        changed = [
            layer
            for layer in self._candidates
            if _fingerprint(getattr(layer.parent, layer.attr)) != self._fingerprints.get(layer.name)
        ]
        if not changed:
            return
        original = self._dense_dtype
        if model_dtype(self.model) != original:
            raise ValueError(
                f"the model was converted to {model_dtype(self.model)} after this session began (e.g. model.half()), "
                f"while its dense original is {original}: convert it back (model.to({original})), or start a new "
                "session on it: forget_session(model), then Session(model, tokenizer)"
            )
        raise ValueError(
            f"{len(changed)} layer(s) changed outside this session since its last apply or reset (first: "
            f"{changed[0].name!r}), e.g. by an optimizer step or a manual edit; apply and reset would overwrite that "
            "and measure would label it wrongly. To discard the change and go back to the dense original: "
            "session.reset(discard_changes=True) (%sparsify reset MODEL --discard-changes)"
        )

    def _validate(
        self,
        *,
        amount,
        mode,
        criterion,
        scope=None,
        pattern=None,
        include=None,
        exclude=None,
        backend=None,
        reconstruct: bool = False,
        calibration: str | None = None,
    ) -> PruneSettings:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        parsed = parse_pattern(pattern)
        if parsed is not None:
            implied = 1 - parsed[0] / parsed[1]
            if amount is not None and abs(float(amount) - implied) > 1e-9:
                raise ValueError(
                    f"pattern {parsed[0]}:{parsed[1]} prunes exactly {implied:.0%}; "
                    f"leave amount out or set it to {implied:g}"
                )
            amount = implied
        if amount is None:
            raise ValueError("amount is required (e.g. 0.3 for 30 %) unless a pattern such as 2:4 is given")
        if scope is None:
            scope = default_scope(criterion)
        settings = PruneSettings(
            amount=validate_amount(amount),
            mode=mode,
            criterion=validate_criterion(criterion, validate_scope(scope), parsed, bool(reconstruct)),
            scope=scope,
            pattern=parsed,
            include=_patterns(include, "include"),
            exclude=_patterns(exclude, "exclude"),
            backend=validate_backend(backend, model_device(self.model)) if mode == "csr" else None,
            reconstruct=bool(reconstruct),
            calibration=validate_calibration(calibration, bool(reconstruct)),
        )
        if mode == "dense":
            return DENSE
        dtype = model_dtype(self.model)
        if settings.reconstruct and dtype != torch.float32:
            raise ValueError(
                f"reconstruct trains the kept weights, which needs a float32 model; this one is "
                f"{dtype}: load it with dtype float32, or leave reconstruct off"
            )
        if mode == "csr":
            self._check_csr_possible(self._layers_for(settings))
        return settings

    def _layers_for(self, settings: PruneSettings) -> list[PrunableLayer]:
        if settings.mode == "dense":
            return []
        if settings.include is None and settings.exclude is None:
            return self.default_layers
        return select_layers(self._candidates, self._heads, settings.include, settings.exclude)

    def _check_csr_possible(self, layers: list[PrunableLayer]) -> None:
        for layer in layers:
            owners = [other.name for other in self._candidates if other.module.weight is layer.module.weight]
            tied_to_embedding = layer.name in self._heads and layer.module.weight is getattr(
                self.model.get_input_embeddings(), "weight", None
            )
            if tied_to_embedding or len(owners) > 1:
                raise ValueError(
                    f"layer {layer.name!r} shares its weight with another module (tied weights), so it cannot be "
                    "stored as CSR; prune it in masked mode or leave it out of include"
                )

    def _snapshot(self, layers: list[PrunableLayer]) -> None:
        """Keep each layer's dense original (once per weight) so that it can be restored."""
        self._originals.keep(
            {
                layer.name: layer.module.weight
                for layer in layers
                if layer.name not in self._originals and _is_first_owner(layer, self._candidates)
            }
        )

    def _prune(self, settings: PruneSettings, layers: list[PrunableLayer], progress: Progress | None) -> None:
        self._snapshot(layers)
        with tqdm_progress(progress, f"{settings.label}") as report:
            prune_with_criterion(layers, settings, report, self._calibrator())
            if settings.mode == "csr":
                for index, layer in enumerate(layers):
                    sparse = CSRLinear.from_dense(layer.module, settings.backend)
                    setattr(layer.parent, layer.attr, sparse)
                    layer.module.weight.data = torch.empty(0, dtype=sparse.values.dtype)  # freed: CSR holds it now
                    report(index + 1, len(layers), f"CSR {layer.name}")
        self.settings, self._pruned = settings, layers

    def _restore_dense(self) -> None:
        """Every layer back to its dense original (atomic in effect, see :meth:`_put_back`)."""
        self._put_back(_SetAside())

    def _restore_layer(self, layer: PrunableLayer) -> None:
        """Put back one layer's dense weight, then its module (idempotent: safe to run again). A weight set
        aside by :meth:`undoable` is left as it is: the layer gets a fresh copy of its original."""
        if layer.name in self._originals:
            original = self._originals.original(layer.name)
            data = layer.module.weight.data
            with torch.no_grad():
                if data.shape == original.shape and not self._aside.holds(data):
                    data.copy_(original)
                else:
                    layer.module.weight.data = original.clone()
        if getattr(layer.parent, layer.attr) is not layer.module:
            setattr(layer.parent, layer.attr, layer.module)

    @contextmanager
    def undoable(self, *, always: bool = False) -> Iterator[None]:
        """Within this block apply / reset / measure as you like: if an exception (an error, Ctrl-C, the panel's
        Stop) escapes it, the model and :attr:`settings` go back to what they were when the block began.

        The variant at entry is put back from stored results, not recomputed: its pruned tensors and CSR modules
        are set aside (the model's memory grows by its masked weights for the duration; CSR costs nothing more),
        so putting it back takes milliseconds and cannot itself be half done.

        Args:
            always: put the variant back also when the block ends normally (what the sweeps need).
        """
        with self._turn():
            if self._aside.active:  # an outer block already holds the state to go back to
                yield
                return
            self._aside = _SetAside.of(self)
            try:
                yield
            except BaseException:
                self._put_back(self._aside)
                self._record_fingerprints()
                raise
            else:
                if always:
                    self._put_back(self._aside)
                    self._record_fingerprints()
            finally:
                self._aside = _SetAside()

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the session for one thread: another thread's call (e.g. the panel's worker busy) is refused."""
        if not self._lock.acquire(blocking=False):
            raise SessionBusyError(
                "the model is busy: the panel is updating it right now; press Stop or wait until it is done, "
                "then run this again"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _put_back(self, state: _SetAside) -> None:
        """Make ``state`` the model's variant (``_SetAside()``: dense). Atomic in effect: an interrupt is held until
        every layer is done (each step is a copy or a pointer assignment, safe to repeat), then raised, so the
        settings always describe the weights."""
        self._originals.check_files()
        kept = {layer.name for layer, _, _ in state.parts}
        pending, interrupt = [layer for layer in self._candidates if layer.name not in kept], None
        while True:
            try:
                while pending:
                    self._restore_layer(pending[0])
                    pending.pop(0)
                for layer, module, data in state.parts:
                    layer.module.weight.data = state.weight(layer, data)
                    setattr(layer.parent, layer.attr, module)
                self.settings, self._pruned = state.settings, [layer for layer, _, _ in state.parts]
                break
            except KeyboardInterrupt as error:
                interrupt = error
        if interrupt is not None:
            raise interrupt

    @contextmanager
    def dense_view(self) -> Iterator[None]:
        """Within this block the model runs as the dense original (no copy is made)."""
        self._originals.check_files()
        saved = []
        for layer in self._pruned:
            saved.append((layer, getattr(layer.parent, layer.attr), layer.module.weight.data))
            layer.module.weight.data = self._originals.original(layer.name)
            setattr(layer.parent, layer.attr, layer.module)
        try:
            yield
        finally:
            for layer, current, data in saved:
                layer.module.weight.data = data
                setattr(layer.parent, layer.attr, current)

    # -- measuring ------------------------------------------------------------------------

    @_exclusive
    def measure(self, latency: bool = False, *, repeats: int = 5) -> dict:
        """Measure the model as it is now; the row is also appended to :attr:`history`.

        Args:
            latency: also time prefill and decode, against dense in the same run.
            repeats: timed repetitions (median reported) after one warm-up.
        """
        if latency and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
            raise ValueError(f"repeats must be a whole number >= 1; got {repeats!r}")
        self.check_unchanged_outside()
        top1, ppl = self.agreement()
        nonzeros = metrics.NonzeroCounts()
        weights = metrics.count_weights(
            (getattr(layer.parent, layer.attr) for layer in (self._pruned or self.default_layers)), nonzeros
        )
        compute = metrics.linear_compute(self.model, nonzeros)
        settings = self.settings
        timed = {}
        if latency:
            variant, dense = measure_against_dense(self.model, self.dense_view, self._corpus, repeats=repeats)
            timed = dict(
                prefill_ms=variant.prefill_ms,
                decode_ms=variant.decode_ms,
                dense_prefill_ms=dense.prefill_ms,
                dense_decode_ms=dense.decode_ms,
                prefill_speedup=dense.prefill_ms / variant.prefill_ms,
                decode_speedup=dense.decode_ms / variant.decode_ms if variant.decode_ms else math.nan,
            )
        row = asdict(
            Measurement(
                setup=settings.label,
                mode=settings.mode,
                criterion=_criterion_label(settings),
                scope=settings.scope if settings.mode != "dense" and not settings.pattern else "",
                pattern=f"{settings.pattern[0]}:{settings.pattern[1]}" if settings.pattern else "",
                amount=settings.amount,
                size_mb=metrics.size_mb(self.model),
                sparsity_prunable=weights.sparsity,
                sparsity_model=metrics.model_weight_count(self.model, nonzeros).sparsity,
                compute_ratio=compute.nonzero / self._dense_compute.nonzero,
                executed_ratio=compute.executed / self._dense_compute.dense,
                top1_match=top1,
                perplexity=ppl,
                eval_tokens=self._corpus.token_count,
                **timed,
            )
        )
        self._rows.append(row)
        return row

    @_exclusive
    def agreement(self) -> tuple[float, float]:
        """``(top1_match, perplexity)`` of the model as it is now on the evaluation corpus, not recorded in
        the history (:meth:`measure` records them with the rest)."""
        result = run_corpus(self.model, self._corpus)
        predictions, _ = flat_predictions(result)
        return (
            metrics.top1_match(self._reference_predictions, predictions, self._reference_mask),
            metrics.perplexity(result.nll_sum, result.target_count),
        )

    @_exclusive
    def token_agreement(self) -> TokenAgreement:
        """``top1_match`` token by token: for every corpus position the token, the dense model's and the model's
        top-1 next token now, and whether they agree (shown coloured in a notebook)."""
        predictions, _ = flat_predictions(run_corpus(self.model, self._corpus))
        return token_agreement(self.tokenizer, self._corpus, self._reference_predictions, predictions)

    def mask_density(self, layer: str | None = None, max_size: int = 256) -> tuple[str, np.ndarray]:
        """A layer's mask as a picture: the share of kept weights in each block of a grid of at most
        ``max_size`` x ``max_size`` blocks (1.0 / 0.0 per weight when the matrix fits).

        Args:
            layer: a prunable layer's name (default: the first pruned one, else the first prunable one).

        Returns:
            ``(name, density)`` with ``density[i, j]`` in [0, 1], rows = outputs, columns = inputs.
        """
        item, kept = self._kept_now(layer)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a whole number >= 1; got {max_size!r}")
        rows, columns = (-(-size // max_size) for size in kept.shape)  # block size, rounded up
        density = torch.nn.functional.avg_pool2d(kept.float()[None, None], (rows, columns), ceil_mode=True)[0, 0]
        return item.name, density.numpy()

    def _kept_now(self, layer: str | None) -> tuple[PrunableLayer, torch.Tensor]:
        """A prunable layer by name (default: the first pruned one, else the first prunable one) and which of its
        weights are kept now (bool ``[out, in]``)."""
        layers = {item.name: item for item in self._candidates}
        name = layer if layer is not None else (self._pruned or self.default_layers)[0].name
        if name not in layers:
            raise ValueError(f"no prunable layer named {name!r}; see layer_table() for the names")
        module = getattr(layers[name].parent, layers[name].attr)
        weight = module.dense_weight() if isinstance(module, CSRLinear) else weight_matrix(module)
        return layers[name], weight != 0

    @_exclusive
    def generate(self, prompt: str, max_new_tokens: int = 30) -> SideBySide:
        """Greedy continuations of ``prompt`` by the dense original (through :meth:`dense_view`, no copy of the
        model) and by the model as it is now, and the first generated token where they part.

        Example:
            >>> session.apply(0.5)
            >>> session.generate("The capital of France is").diverge_at
        """
        return side_by_side(self.model, self.tokenizer, self.dense_view, prompt, max_new_tokens)

    @property
    def history(self) -> pd.DataFrame:
        """Every measured row, oldest first."""
        return pd.DataFrame(self._rows, columns=list(HISTORY_COLUMNS))

    def to_csv(self, path: str | Path) -> Path:
        """Write :attr:`history` as CSV; returns the path (``~`` is the home folder)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.history.to_csv(path, index=False)
        return path

    def layer_table(self) -> pd.DataFrame:
        """Per prunable layer: name, block, role, kind, shape, nnz, sparsity and storage format."""
        rows = []
        for layer in self._pruned or self.default_layers:
            module = getattr(layer.parent, layer.attr)
            count = metrics.count_weights([module])
            rows.append(
                {
                    "name": layer.name,
                    "block": layer.block,
                    "role": layer.role,
                    "kind": "Conv1D" if layer.transposed else "Linear",
                    "shape": "x".join(str(d) for d in _logical_shape(module)),
                    "nnz": count.total - count.zeros,
                    "sparsity": count.sparsity,
                    "format": "csr" if isinstance(module, CSRLinear) else "dense",
                }
            )
        return pd.DataFrame(rows)

    def coverage(self) -> float:
        """Share of the model's matmul weights that this session can prune.

        Matmul weights: every distinct parameter of 2 or more dimensions outside ``nn.Embedding`` modules (the
        input and position embeddings are lookups, not matmuls; a head tied to them is left out with them), CSR
        layers at their dense shape: linear layers, the output head, MoE experts and routers. The session can prune
        its prunable layers (:attr:`default_layers`, plus the untied head and the linear routers when named in
        ``include``). Fused MoE experts the session can split (:mod:`.experts`) count as prunable; any other
        weight left out (e.g. an experts layout it does not know) lowers the share.
        """
        return self._matmul_coverage().share

    def _matmul_coverage(self) -> metrics.MatmulCoverage:
        modules = (getattr(layer.parent, layer.attr) for layer in self._candidates)
        return metrics.matmul_coverage(self.model, modules)

    @property
    def calibration_bytes(self) -> int:
        """Memory held by the calibration statistics kept for ``calibration="once"`` (input norms, Hessians)."""
        return self._calibration.nbytes if self._calibration is not None else 0

    @property
    def undo_bytes(self) -> UndoBytes:
        """What undo costs (the dense original of the default layers from the start, and of any other layer an
        apply pruned): bytes held in RAM (``.ram``) and bytes read back from files on disk (``.disk``)."""
        return self._originals.nbytes

    def break_even_table(self) -> pd.DataFrame:
        """Sparsity above which a CSR layer is smaller than dense, per column format, at the model's dtype."""
        dtype = model_dtype(self.model)
        formats = (
            ("CSR int64 (torch default)", torch.int64, "8 per nonzero"),
            ("CSR int32 (backend torch)", torch.int32, "4 per nonzero"),
            ("CSR uint16 (backend fast, sparsity > 15/16)", torch.int16, "2 per nonzero"),
            ("CSR bitmap (backend fast)", torch.uint8, "1/8 per weight"),
        )
        rows = [
            {"format": label, "index_bytes": cost, "break_even_sparsity": metrics.csr_break_even(dtype, index)}
            for label, index, cost in formats
        ]
        return pd.DataFrame(rows)

    def layer_scores(self, layer: str | None = None) -> tuple[str, str, np.ndarray, np.ndarray]:
        """The scores the current criterion ranks one layer's *dense* weights by, and which weights are kept now.

        Magnitude: ``|W|``. Wanda: ``|W|·‖X‖`` with the input norms an earlier apply cached (``calibration="once"``).
        SparseGPT / ADMM: ``|W|·‖X‖/√N`` from the diagonal of the cached Hessian, a Wanda-like view: they choose by
        their own saliency while updating the kept weights. Without cached statistics, or for an MoE expert that too few
        calibration tokens reached (pruned by magnitude): ``|W|``, and the label says so.

        Args:
            layer: a prunable layer's name (default: the first pruned one, else the first prunable one).

        Returns:
            ``(name, label, scores, kept)``: the label names the score; scores (float32) and kept (bool) are
            ``[out, in]`` arrays.
        """
        from .scores import magnitude_scores, wanda_scores

        item, kept = self._kept_now(layer)
        name = item.name
        with self.dense_view():
            weight = weight_matrix(item.module).detach().clone()
        criterion = self.settings.criterion if self.settings.mode != "dense" else "magnitude"
        calibrator = self._calibration  # statistics of calibration="once" if an apply collected them; none computed
        norm, hessian = (calibrator.cached(want, name) if calibrator else None for want in ("norms", "hessians"))
        if criterion != "magnitude" and calibrator and pruned_by_magnitude(calibrator, item):
            scores = magnitude_scores(weight)
            label = f"|W| (too few calibration tokens were routed to this expert for {criterion}: pruned by magnitude)"
        elif criterion == "wanda" and norm is not None:
            scores, label = wanda_scores(weight, norm), "|W|·‖X‖ (Wanda, ‖X‖ on the dense model)"
        elif criterion in ("sparsegpt", "admm") and hessian is not None:
            scores = wanda_scores(weight, hessian.diagonal().float().sqrt())
            label = f"|W|·‖X‖/√N (Hessian diagonal; {criterion} ranks by its own saliency)"
        else:
            scores = magnitude_scores(weight)
            label = "|W|" if criterion == "magnitude" else f"|W| (no cached {criterion} statistics)"
        return name, label, scores.float().cpu().numpy(), kept.cpu().numpy()

    @_exclusive
    def save(self, path: str | Path, format: str = "dense", overwrite: bool = False):
        """Write the model as it is now and its tokenizer as a Hugging Face folder; see :mod:`.saving`.

        Args:
            format: ``dense`` (safetensors with the zeros, loadable anywhere) or ``compressed``
                (compressed-tensors' sparse bitmask; read back with ``load_model(path)``).
            overwrite: replace a model folder saved there before.

        Returns:
            A :class:`~jupyter_sparsify.saving.SavedModel` with the folder's ``size_on_disk_mb``.
        """
        from .saving import save_session

        if Path(path).expanduser().resolve() in self._originals.folders:
            raise ValueError(
                f"{path} holds the checkpoint that this session reads the dense original back from: saving over it "
                "would lose the dense model; save to another folder"
            )
        return save_session(self, path, format, overwrite)


@dataclass
class _SetAside:
    """A variant kept aside by :meth:`Session.undoable`: its settings and, per pruned layer, the module in the
    model's tree (the layer itself or its CSR replacement) and the layer's weight tensor.

    The weights are held as they are (the model then gets fresh tensors for its next variant), unless holding them
    would not fit the memory (:func:`~jupyter_sparsify.undo.spill_wanted`): then their values are written to a spill
    file, the model's tensors are reused in place, and putting the variant back reads the values from the file."""

    settings: PruneSettings = DENSE
    parts: list[tuple[PrunableLayer, nn.Module, torch.Tensor]] = field(default_factory=list)
    active: bool = False
    spilled: SpillFile | None = None
    _storages: frozenset[int] = frozenset()

    @classmethod
    def of(cls, session: Session) -> _SetAside:
        parts = [(layer, getattr(layer.parent, layer.attr), layer.module.weight.data) for layer in session._pruned]
        held = {layer.name: data for layer, _, data in parts if data.numel()}
        if spill_wanted(sum(data.numel() * data.element_size() for data in held.values()), session._originals.mode):
            return cls(session.settings, parts, active=True, spilled=SpillFile(cache_dir() / "undo", held))
        storages = frozenset(data.untyped_storage().data_ptr() for data in held.values())
        return cls(session.settings, parts, active=True, _storages=storages)

    def weight(self, layer: PrunableLayer, data: torch.Tensor) -> torch.Tensor:
        """The weight tensor to put back for ``layer``: the one held, or its values read back from the spill file
        (into the model's tensor when it fits)."""
        if self.spilled is None or not data.numel():
            return data
        return self.spilled.read_into(layer.name, layer.module.weight.data)

    def holds(self, data: torch.Tensor) -> bool:
        """Whether ``data`` shares memory with a weight set aside (it must then not be written to)."""
        return data.numel() > 0 and data.untyped_storage().data_ptr() in self._storages


_SESSIONS: dict[int, Session] = {}


def session_for(model: nn.Module, tokenizer=None, texts: Sequence[str] | None = None) -> Session:
    """The one session of ``model`` (created on first use), shared by the magics and the panel."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. from load_model()); got {type(model).__name__}")
    session = existing_session(model)
    if session is None:
        if tokenizer is None:
            raise ValueError("this model has no session yet: pass its tokenizer")
        session = Session(model, tokenizer, texts if texts is not None else SEED_TEXTS)
    elif texts is not None:
        session.set_texts(texts)
    return session


def existing_session(model: nn.Module) -> Session | None:
    """The model's session if it has one."""
    session = _SESSIONS.get(id(model))
    return session if session is not None and session.model is model else None


def all_sessions() -> list[Session]:
    """Every live session (one per wrapped model)."""
    return list(_SESSIONS.values())


def forget_session(model: nn.Module) -> None:
    """Drop the model's session (its dense reference and undo copy), e.g. before loading another model."""
    session = _SESSIONS.get(id(model))
    if session is not None and session.model is model:
        session.reset()
        fuse_experts(model)  # transformers' own experts layout again
        restore_offload(session._offloaded)
        del _SESSIONS[id(model)]


def _fingerprint(module: nn.Module) -> int:
    """Exact, order-independent checksum of a layer's weight (CSR: its values): its bytes read as 64-bit integers
    and summed modulo 2**64 (wide words: a narrow sum promoted to int64 runs 20x slower), plus the leftover bytes."""
    tensor = module.values if isinstance(module, CSRLinear) else module.weight
    data = tensor.detach().contiguous().view(-1).view(torch.uint8)
    whole = data.numel() // 8 * 8
    if data[:whole].data_ptr() % 8:  # a view that does not start on a word boundary
        data = data.clone()
    words = int(data[:whole].view(torch.int64).sum()) if whole else 0
    return words + int(data[whole:].sum(dtype=torch.int64)) + 7919 * tensor.numel()


def _check_no_torch_prune(model: nn.Module) -> None:
    """Refuse a model that ``torch.nn.utils.prune`` has reparametrised (``weight_orig`` + a mask hook)."""
    from torch.nn.utils import prune

    for name, module in model.named_modules():
        if any(isinstance(hook, prune.BasePruningMethod) for hook in module._forward_pre_hooks.values()):
            raise ValueError(
                f"layer {name!r} was pruned with torch.nn.utils.prune (it has weight_orig and a mask "
                f"hook), which this session would silently mix in: call torch.nn.utils.prune.remove(module, "
                f"'weight') on it to make the pruning permanent first"
            )


def _warn_if_low_coverage(session: Session) -> None:
    """Warn once, at the session's start, when it can prune less than :data:`LOW_COVERAGE` of the matmul weights."""
    coverage = session._matmul_coverage()
    if coverage.share < LOW_COVERAGE:
        largest = sorted(coverage.uncovered.items(), key=lambda item: -item[1])[:3]
        where = ", ".join(f"{owner} ({count:,} weights)" for owner, count in largest)
        warnings.warn(
            f"jupyter_sparsify: this session can prune only {coverage.share:.0%} of the model's matmul weights; the "
            f"rest stays dense whatever you apply, mostly {where}: they are not nn.Linear layers (nor fused experts "
            "in a layout the session knows how to split), so amounts and sparsities cover "
            "the prunable part only",
            stacklevel=3,
        )


def _criterion_label(settings: PruneSettings) -> str:
    """The history's ``criterion``: e.g. ``wanda``, ``admm+recon``, ``sparsegpt+seq`` (each its own chart curve)."""
    if settings.mode == "dense":
        return ""
    if settings.reconstruct:
        return settings.criterion + "+recon"
    if settings.calibration == "sequential" and settings.criterion != "magnitude":
        return settings.criterion + "+seq"
    return settings.criterion


def _is_first_owner(layer: PrunableLayer, candidates: list[PrunableLayer]) -> bool:
    return next(c for c in candidates if c.module.weight is layer.module.weight) is layer


def _patterns(patterns: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    if isinstance(patterns, str):
        raise TypeError(f"{what} must be a list of glob patterns; got the string {patterns!r} (wrap it in a list)")
    if what == "include" and patterns is not None and len(patterns) == 0:
        raise ValueError(
            "include is an empty list, which selects no layer: give glob patterns, or None for the default"
        )
    return tuple(patterns) if patterns is not None else None


def _logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a dense or CSR layer."""
    if isinstance(module, CSRLinear):
        return module.out_features, module.in_features
    return tuple(weight_matrix(module).shape)
