"""The ``%sparsify`` line magic and ``%%sparsify corpus`` cell magic.

Each subcommand has its own small parser; a bad command raises ``UsageError`` with one clear
line. The work itself is done by :class:`~jupyter_sparsify.session.Session`.
"""

from __future__ import annotations

import argparse
import shlex

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from torch import nn

from .charts import write_report
from .corpus import check_next_token_targets, validate_texts
from .criteria import CALIBRATIONS
from .kernels import KernelUnavailableError
from .models import ModelLoadError, load_model, model_dtype
from .session import SessionBusyError, all_sessions, existing_session, forget_session, session_for
from .sweeps import compare, sensitivity

SUBCOMMANDS = (
    "load",
    "prune",
    "stats",
    "layers",
    "compare",
    "reset",
    "generate",
    "tokens",
    "mask",
    "history",
    "panel",
    "sensitivity",
    "save",
    "corpus",
)


class _HelpShown(Exception):
    """argparse printed --help; nothing else to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            raise UsageError(message.strip())
        raise _HelpShown()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line of ``%sparsify``; ``%sparsify --help`` prints it."""
    parser = _Parser(prog="%sparsify", description="Prune a causal LM in place and measure what it does.")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)

    load = commands.add_parser("load", help="load a model (default: the embedded SmolLM2-135M-Instruct)")
    load.add_argument("source", nargs="?", help="hub name, local directory or .gguf file (default: embedded model)")
    load.add_argument("--as", dest="names", default="model,tokenizer", help="variable names MODEL,TOKENIZER")
    load.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="load the weights in this dtype (default: float32 on CPU)",
    )

    prune = commands.add_parser("prune", help="prune MODEL in place (always from the dense original)")
    _model_arguments(prune)
    prune.add_argument("--amount", type=float, default=None, help="fraction to prune, in [0, 1), e.g. 0.3")
    _method_arguments(prune)
    prune.add_argument(
        "--mode",
        choices=["masked", "csr"],
        default="masked",
        help="masked: zeros in dense tensors; csr: pruned layers stored and run as sparse",
    )
    prune.add_argument("--include", nargs="+", default=None, metavar="GLOB", help="only these layers (names, globs)")
    prune.add_argument("--exclude", nargs="+", default=None, metavar="GLOB", help="leave these layers dense")
    prune.add_argument("--backend", choices=["fast", "torch"], default=None, help="CSR kernels (default: fastest)")
    _latency_arguments(prune)

    stats = commands.add_parser("stats", help="measure MODEL as it is now: one row")
    _model_arguments(stats)
    _latency_arguments(stats)

    layers = commands.add_parser("layers", help="per-layer table and sparsity chart")
    _model_arguments(layers)

    compare = commands.add_parser("compare", help="sweep amounts x modes; leaves MODEL as it was")
    _model_arguments(compare)
    compare.add_argument(
        "--amounts",
        type=float,
        nargs="+",
        default=[0.0, 0.3],
        metavar="A",
        help="fractions to prune, each in [0, 1); 0 is the dense model",
    )
    compare.add_argument(
        "--modes",
        nargs="+",
        choices=["masked", "csr"],
        default=["masked", "csr"],
        help="modes to measure at each amount",
    )
    _method_arguments(compare)
    _latency_arguments(compare)

    reset = commands.add_parser("reset", help="back to the dense original, bit-exact")
    _model_arguments(reset)
    reset.add_argument(
        "--discard-changes", action="store_true", help="also when weights were changed outside the session"
    )

    generate = commands.add_parser("generate", help="greedy continuations of a prompt: dense and MODEL as it is now")
    _model_arguments(generate)
    generate.add_argument("prompt", help='the text to continue, in quotes: "The capital of France is"')
    generate.add_argument("--tokens", type=_at_least_one, default=30, help="tokens to generate (default 30)")

    tokens = commands.add_parser("tokens", help="the evaluation texts token by token: where MODEL agrees with dense")
    _model_arguments(tokens)

    mask = commands.add_parser("mask", help="one layer's mask as an image (kept black, pruned white)")
    _model_arguments(mask)
    mask.add_argument("--layer", default=None, help="layer name (default: the first pruned one)")

    history = commands.add_parser("history", help="every measured row")
    history.add_argument("model", nargs="?", help="variable name (default: the model used last)")
    history.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    history.add_argument(
        "--html", default=None, metavar="PATH", help="also write a standalone HTML report (charts + table)"
    )
    history.add_argument(
        "--chart", action="store_true", help="also show the charts (bars per setup, curves over sparsity)"
    )

    panel = commands.add_parser("panel", help="open the interactive panel with live charts")
    panel.add_argument("model", help="variable name of the model")
    panel.add_argument(
        "tokenizer_name",
        nargs="?",
        default=None,
        metavar="TOKENIZER",
        help="variable name of its tokenizer (default: the one it was loaded with)",
    )

    sensitivity = commands.add_parser("sensitivity", help="top-1 drop when each layer alone is magnitude-pruned")
    _model_arguments(sensitivity)
    sensitivity.add_argument("--amount", type=float, default=0.5, help="fraction each layer alone loses")

    save = commands.add_parser("save", help="write MODEL as it is now as a Hugging Face folder")
    save.add_argument("model", help="variable name of the model")
    save.add_argument("path", help="folder to write (new or empty; load it back with %%sparsify load PATH)")
    save.add_argument(
        "--format",
        choices=["dense", "compressed"],
        default="dense",
        help="dense: safetensors with the zeros, loadable anywhere; compressed: compressed-tensors' sparse bitmask",
    )
    save.add_argument("--overwrite", action="store_true", help="replace a model folder saved at PATH before")

    commands.add_parser("corpus", help="%%%%sparsify corpus: the cell's lines become the evaluation texts")
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="variable name of the model")
    parser.add_argument("--tokenizer", default=None, metavar="NAME", help="variable name of its tokenizer")


def _latency_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency", action="store_true", help="also time prefill and decode against dense")
    parser.add_argument(
        "--repeats", type=_at_least_one, default=5, help="timed repeats (median reported) after a warm-up"
    )


def _method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--criterion", default="magnitude", help="magnitude, wanda, sparsegpt or admm")
    parser.add_argument(
        "--scope",
        default=None,
        help="global, layer or row (default: the criterion's own: global for magnitude, row otherwise)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        choices=CALIBRATIONS,
        help="wanda/sparsegpt/admm: once (dense statistics, collected once and reused: seconds per "
        "apply; the default) or sequential (block by block, as in the papers: minutes)",
    )
    parser.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (keeps 2 of every 4 weights)")
    parser.add_argument(
        "--reconstruct",
        action="store_true",
        help="after each block is pruned, tune its kept weights to reproduce the dense block",
    )


def _at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (checked while parsing, before anything changes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}")
    return value


@magics_class
class SparsifyMagics(Magics):
    """``%sparsify SUBCOMMAND ...``: load, prune, measure and compare a causal LM in place."""

    def __init__(self, shell) -> None:
        super().__init__(shell)
        self._tokenizers: dict[int, object] = {}
        self._texts: list[str] | None = None
        self._last_model: str | None = None

    @line_cell_magic
    def sparsify(self, line: str, cell: str | None = None):
        """Prune a causal LM in place and measure what it does.

        Subcommands (``%sparsify SUBCOMMAND --help`` for each)::

            %sparsify load [SOURCE] [--as MODEL,TOKENIZER] [--dtype float32|float16|bfloat16]
            %sparsify prune MODEL --amount 0.3 [--mode masked|csr] [--criterion magnitude|wanda|sparsegpt|admm]
                                  [--scope global|layer|row] [--pattern 2:4] [--calibration once|sequential]
                                  [--reconstruct]
                                  [--include GLOB..] [--exclude GLOB..]
            %sparsify stats MODEL [--latency]
            %sparsify layers MODEL
            %sparsify compare MODEL --amounts 0 0.3 0.5 0.7 [--modes masked csr] [--latency]
            %sparsify reset MODEL
            %sparsify generate MODEL "PROMPT" [--tokens 30]
            %sparsify tokens MODEL
            %sparsify mask MODEL [--layer NAME]
            %sparsify history [MODEL] [--csv PATH] [--html PATH] [--chart]
            %sparsify panel MODEL [TOKENIZER]
            %sparsify sensitivity MODEL [--amount 0.5]
            %sparsify save MODEL PATH [--format dense|compressed] [--overwrite]
            %%sparsify corpus        (cell body: evaluation texts, one per line)
        """
        try:
            args = build_parser().parse_args(shlex.split(line))
        except _HelpShown:
            return None
        except ValueError as error:  # shlex: unbalanced quotes
            raise UsageError(f"%sparsify: {error}") from None
        if args.command is None:
            raise UsageError("%sparsify needs a subcommand: " + ", ".join(SUBCOMMANDS) + " (see %sparsify --help)")
        if (cell is not None) != (args.command == "corpus"):
            raise UsageError(
                "corpus is a cell magic: start the cell with %%sparsify corpus, one text per line"
                if args.command == "corpus"
                else "only %%sparsify corpus takes a cell body"
            )
        try:
            return (
                getattr(self, f"_{args.command}")(args, cell)
                if cell is not None
                else getattr(self, f"_{args.command}")(args)
            )
        except (ValueError, TypeError, ModelLoadError, KernelUnavailableError, SessionBusyError) as error:
            raise UsageError(str(error)) from None
        except OSError as error:  # a path that cannot be written or read: say which and why, in one line
            where = f": {error.filename}" if error.filename else ""
            raise UsageError(f"{error.strerror or error}{where}") from None

    # -- subcommands ------------------------------------------------------------------------

    def _load(self, args):
        names = [name.strip() for name in args.names.split(",")]
        if len(names) != 2 or not all(name.isidentifier() for name in names):
            raise UsageError(f"--as takes two variable names MODEL,TOKENIZER; got {args.names!r}")
        model, tokenizer = load_model(args.source, dtype=args.dtype)
        previous = self.shell.user_ns.get(names[0])
        if isinstance(previous, nn.Module):
            forget_session(previous)
            self._tokenizers.pop(id(previous), None)  # the replaced model's tokenizer is not kept alive
        self.shell.user_ns[names[0]], self.shell.user_ns[names[1]] = model, tokenizer
        self._tokenizers[id(model)] = tokenizer
        self._last_model = names[0]
        count = sum(p.numel() for p in model.parameters())
        label = args.source or "the embedded SmolLM2-135M-Instruct"
        print(f"Loaded {label}: {count / 1e6:.1f} M parameters, {model_dtype(model)} -> `{names[0]}`, `{names[1]}`")

    def _prune(self, args):
        session = self._session(args)
        session.apply(
            args.amount,
            mode=args.mode,
            include=args.include,
            exclude=args.exclude,
            backend=args.backend,
            **_criterion_options(args),
        )
        return pd.DataFrame([session.measure(latency=args.latency, repeats=args.repeats)])

    def _stats(self, args):
        return pd.DataFrame([self._session(args).measure(latency=args.latency, repeats=args.repeats)])

    def _layers(self, args):
        from .charts import LayerChart

        table = self._session(args).layer_table()
        chart = LayerChart()
        chart.update(table)
        _show(chart.figure)
        return table

    def _compare(self, args):
        session, options = self._session(args), _criterion_options(args)
        table = compare(session, args.amounts, args.modes, latency=args.latency, repeats=args.repeats, **options)
        _show_variants(table)
        return table

    def _generate(self, args):
        return self._session(args).generate(args.prompt, max_new_tokens=args.tokens)

    def _tokens(self, args):
        return self._session(args).token_agreement()

    def _mask(self, args):
        from .charts import mask_figure

        _show(mask_figure(*self._session(args).mask_density(args.layer)))

    def _reset(self, args):
        self._session(args).reset(discard_changes=args.discard_changes)
        print(f"`{args.model}` is dense again (bit-exact original).")

    def _history(self, args):
        name = args.model or self._last_model
        if name is None:
            raise UsageError("no model measured yet: name one, e.g. %sparsify history model")
        session = session_for(self._model(name))
        if args.csv:
            print(f"Wrote {session.to_csv(args.csv)}")
        if args.html:
            print(f"Wrote {write_report(args.html, session.history, session.layer_table())}")
        if args.chart:
            _show_variants(session.history)
        return session.history

    def _panel(self, args):
        from .panel import Panel

        tokenizer = self._model_tokenizer_by_name(args.tokenizer_name) if args.tokenizer_name else None
        Panel(self._session_of(args.model, tokenizer)).show()

    def _sensitivity(self, args):
        from .charts import sensitivity_figure

        table = sensitivity(self._session(args), args.amount)
        _show(sensitivity_figure(table))
        return table

    def _save(self, args):
        print(self._session_of(args.model).save(args.path, format=args.format, overwrite=args.overwrite))

    def _corpus(self, args, cell: str):
        texts = [line.strip() for line in cell.splitlines() if line.strip()]
        if not texts:
            raise UsageError("the %%sparsify corpus cell is empty: write one evaluation text per line")
        texts = validate_texts(texts)
        for session in all_sessions():  # every check before anything changes
            check_next_token_targets(session.tokenizer, texts)
        self._texts = texts
        for session in all_sessions():
            session.set_texts(texts)
        print(f"Evaluation corpus: {len(texts)} texts; later measurements use it.")

    # -- lookups ----------------------------------------------------------------------------

    def _model(self, name: str) -> nn.Module:
        if name not in self.shell.user_ns:
            raise UsageError(
                f"no variable named {name!r} in the notebook; load a model first: %sparsify load --as {name},tokenizer"
            )
        model = self.shell.user_ns[name]
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"{name!r} is a {type(model).__name__}, not a torch model; pass the variable that holds the model"
            )
        return model

    def _model_tokenizer_by_name(self, name: str):
        if name not in self.shell.user_ns:
            raise UsageError(f"no variable named {name!r} in the notebook (the tokenizer)")
        return self.shell.user_ns[name]

    def _session(self, args):
        tokenizer = self._model_tokenizer_by_name(args.tokenizer) if getattr(args, "tokenizer", None) else None
        return self._session_of(args.model, tokenizer)

    def _session_of(self, name: str, tokenizer=None):
        model = self._model(name)
        known = existing_session(model)
        if known is None and tokenizer is None:
            tokenizer = self._tokenizers.get(id(model))
            if tokenizer is None:
                raise UsageError(
                    f"which tokenizer goes with {name!r}? pass --tokenizer NAME (or load it with %sparsify load)"
                )
        self._last_model = name
        return known or session_for(model, tokenizer, self._texts)


def _criterion_options(args) -> dict:
    """The options of ``prune`` and ``compare`` that say how to choose the weights."""
    return dict(
        criterion=args.criterion,
        scope=args.scope,
        pattern=args.pattern,
        reconstruct=args.reconstruct,
        calibration=args.calibration,
    )


def _show(obj) -> None:
    from bokeh.io import show

    show(obj)


def _show_variants(history: pd.DataFrame) -> None:
    from .charts import VariantCharts

    charts = VariantCharts()
    charts.update(history)
    _show(charts.layout())


def register(ipython) -> None:
    """Register the magics (again: harmless) and set Bokeh up for offline notebooks."""
    from bokeh.io import output_notebook
    from bokeh.resources import INLINE

    ipython.register_magics(SparsifyMagics)
    output_notebook(resources=INLINE, hide_banner=True)


def unregister(ipython) -> None:
    """Remove the magics."""
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("sparsify", None)
