"""The %sparsify magics through a real IPython InteractiveShell."""

from __future__ import annotations

import pandas as pd
import pytest
from IPython.core.error import UsageError

from jupyter_sparsify.formats import CSRLinear
from jupyter_sparsify.magics import SUBCOMMANDS, build_parser
from jupyter_sparsify.session import existing_session

from helpers import state_checksum, tiny_model


@pytest.fixture
def tiny(shell, tokenizer):
    shell.user_ns["tiny"], shell.user_ns["tok"] = tiny_model("llama"), tokenizer
    shell.run_line_magic("sparsify", "stats tiny --tokenizer tok")  # makes the session
    return shell.user_ns["tiny"]


def magic(shell, line):
    return shell.run_line_magic("sparsify", line)


def test_loading_twice_is_harmless_and_unload_removes_the_magic(shell):
    shell.run_line_magic("load_ext", "jupyter_sparsify")
    shell.run_line_magic("reload_ext", "jupyter_sparsify")
    assert "sparsify" in shell.magics_manager.magics["line"]
    shell.run_line_magic("unload_ext", "jupyter_sparsify")
    assert "sparsify" not in shell.magics_manager.magics["line"]
    shell.run_line_magic("load_ext", "jupyter_sparsify")
    assert "sparsify" in shell.magics_manager.magics["cell"]


def test_load_binds_the_embedded_model_under_the_given_names(shell):
    magic(shell, "load --as smol,smol_tok")
    model, tok = shell.user_ns["smol"], shell.user_ns["smol_tok"]
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None
    row = magic(shell, "stats smol")  # the tokenizer is remembered from load
    assert isinstance(row, pd.DataFrame) and row.loc[0, "setup"] == "Dense" and row.loc[0, "top1_match"] == 1.0
    del shell.user_ns["smol"], shell.user_ns["smol_tok"]


def test_prune_stats_layers_reset_history(shell, tiny, tmp_path):
    before = state_checksum(tiny)
    row = magic(shell, "prune tiny --amount 0.5 --mode csr --scope row")
    assert row.loc[0, "setup"] == "CSR 50% row" and abs(row.loc[0, "sparsity_prunable"] - 0.5) < 1e-6
    assert any(isinstance(m, CSRLinear) for m in tiny.modules())
    layers = magic(shell, "layers tiny")
    assert set(layers["format"]) == {"csr"} and len(layers) == 14
    assert magic(shell, "stats tiny").loc[0, "setup"] == "CSR 50% row"
    magic(shell, "reset tiny")
    assert state_checksum(tiny) == before
    history = magic(shell, f"history tiny --csv {tmp_path / 'h.csv'}")
    assert list(history["setup"]) == ["Dense", "CSR 50% row", "CSR 50% row"]
    assert pd.read_csv(tmp_path / "h.csv").shape == history.shape


def test_compare_sweeps_and_leaves_the_model_as_it_was(shell, tiny):
    magic(shell, "prune tiny --amount 0.4")
    before = state_checksum(tiny)
    table = magic(shell, "compare tiny --amounts 0 0.3 0.5 --modes masked csr")
    assert list(table["setup"]) == ["Dense", "Masked 30%", "CSR 30%", "Masked 50%", "CSR 50%"]
    size = dict(zip(table["setup"], table["size_mb"]))
    # bitmap columns: 1/8 byte per weight + 4 per nonzero against dense's 4, so CSR breaks even at 3 %
    assert size["Dense"] == size["Masked 30%"] > size["CSR 30%"] > size["CSR 50%"]
    assert state_checksum(tiny) == before and existing_session(tiny).settings.label == "Masked 40%"


def test_prune_with_block_reconstruction(shell, tiny):
    existing_session(tiny).set_calibration_texts(["The valley is quiet and the river bends."] * 4)
    row = magic(shell, "prune tiny --amount 0.5 --criterion wanda --scope row --reconstruct")
    assert row.loc[0, "setup"] == "Masked 50% wanda row +recon" and row.loc[0, "criterion"] == "wanda+recon"
    assert abs(row.loc[0, "sparsity_prunable"] - 0.5) < 1e-6
    magic(shell, "reset tiny")


def test_the_magics_find_a_session_made_in_python(shell, tokenizer):
    from jupyter_sparsify import Session

    model = tiny_model("opt")
    dense = state_checksum(model)
    session = Session(model, tokenizer)
    session.apply(0.5)
    shell.user_ns["made_in_python"], shell.user_ns["its_tok"] = model, tokenizer
    magic(shell, "reset made_in_python --tokenizer its_tok")  # the same session: its dense original
    assert existing_session(model) is session and state_checksum(model) == dense
    del shell.user_ns["made_in_python"], shell.user_ns["its_tok"]


def test_a_corpus_of_single_tokens_is_refused_and_changes_nothing(shell, tiny):
    before = list(existing_session(tiny).texts)
    with pytest.raises(UsageError, match="single token"):
        shell.run_cell_magic("sparsify", "corpus", "Hello\nWorld\n")
    assert existing_session(tiny).texts == before
    magic(shell, "prune tiny --amount 0.5")  # every later action still works
    assert magic(shell, "stats tiny").loc[0, "eval_tokens"] > 0
    magic(shell, "reset tiny")


def test_corpus_cell_changes_later_measurements(shell, tiny):
    shell.run_cell_magic("sparsify", "corpus", "The valley is quiet.\nThe river bends slowly.\n")
    assert existing_session(tiny).texts == ["The valley is quiet.", "The river bends slowly."]
    assert magic(shell, "stats tiny").loc[0, "eval_tokens"] == 10  # 4 words and a full stop, twice
    from jupyter_sparsify.corpus import SEED_TEXTS

    shell.run_cell_magic("sparsify", "corpus", "\n".join(SEED_TEXTS))
    assert existing_session(tiny).texts == list(SEED_TEXTS)


@pytest.mark.parametrize(
    "line, words",
    [
        ("", "needs a subcommand"),
        ("explode tiny", "invalid choice"),
        ("prune nowhere --amount 0.3", "no variable named 'nowhere'"),
        ("prune tok --amount 0.3", "not a torch model"),
        ("prune tiny --amount 1.5", "amount must be in [0, 1)"),
        ("prune tiny --amount lots", "invalid float value"),
        ("prune tiny --amount 0.3 --mode sparse", "invalid choice"),
        ("prune tiny --amount 0.3 --criterion random", "criterion must be one of"),
        ("prune tiny --amount 0.3 --reconstruct", "calibrates block by block"),
        ("prune tiny --amount 0.3 --latency --repeats 0", "must be a whole number >= 1"),
        ("prune tiny --amount 0.3 --criterion wanda --calibration twice", "invalid choice"),
        ("prune tiny --amount 0.3 --criterion wanda --reconstruct --calibration once", "calibration='sequential'"),
        ("prune tiny --amount 0.3 --include '*.nothing'", "matches no linear layer"),
        ("load --as onlyone", "--as takes two variable names"),
        ("load /no/such/model.gguf", "GGUF file not found"),
        ("corpus", "cell magic"),
        ("history tiny --csv /tmp", "Is a directory"),
        ("compare tiny --amounts 0 nan 0.5", "amount must be in [0, 1)"),
        ("compare tiny --amounts 0 -0.3", "amount must be in [0, 1)"),
        ("history tiny --csv /proc/x.csv", "/proc/x.csv"),
    ],
)
def test_errors_are_one_line_usage_errors_and_change_nothing(shell, tiny, line, words):
    magic(shell, "prune tiny --amount 0.3")
    before = state_checksum(tiny)
    with pytest.raises(UsageError) as caught:
        magic(shell, line)
    assert words in str(caught.value) and "\n" not in str(caught.value).strip()
    assert state_checksum(tiny) == before


def test_a_bad_command_in_a_cell_shows_no_traceback(shell, tiny, capsys):
    result = shell.run_cell("%sparsify prune tiny --amount 2")
    assert isinstance(result.error_in_exec, UsageError)
    shown = capsys.readouterr()
    assert "Traceback" not in shown.out + shown.err and "amount must be in [0, 1)" in shown.out + shown.err


def test_help_lists_every_subcommand(shell, capsys):
    magic(shell, "--help")
    text = capsys.readouterr().out
    doc = shell.find_line_magic("sparsify").__doc__
    for command in SUBCOMMANDS:
        assert f"    {command}" in text and f"%sparsify {command}" in doc.replace("%%sparsify", "%sparsify")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_explains_its_own_options(shell, capsys, command):
    magic(shell, f"{command} --help")
    text = capsys.readouterr().out
    assert text.startswith(f"usage: %sparsify {command}")
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    options = [action.option_strings[-1] for action in subparser._actions if action.option_strings]
    positionals = [action.metavar or action.dest for action in subparser._actions if not action.option_strings]
    for word in options + positionals:
        assert word in text, (command, word)
    undocumented = [action.dest for action in subparser._actions if not action.help]
    assert not undocumented, f"{command}: options without a help text: {undocumented}"


def test_sensitivity_ranks_layers_and_leaves_the_model_as_it_was(shell, tiny):
    magic(shell, "prune tiny --amount 0.3 --mode csr")
    before = state_checksum(tiny)
    table = magic(shell, "sensitivity tiny --amount 0.9")
    assert len(table) == 14 and table["top1_drop"].is_monotonic_decreasing
    assert table["top1_drop"].iloc[0] > 0
    assert state_checksum(tiny) == before


def test_panel_opens_from_the_magic(shell, tiny, capsys):
    magic(shell, "panel tiny")
    shown = capsys.readouterr().out  # a terminal shell shows the text fallback of the widget and snapshot
    assert "jupyter_sparsify panel: 1 measurements" in shown
