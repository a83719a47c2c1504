"""Tests for configurable.py: typed parsing, one-line errors, presets, help, and no code execution."""
from __future__ import annotations  # annotations become strings, as in a sample.py that uses it

import ast
import contextlib
import dataclasses
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import configurable
from configurable import ConfigError, TrainConfig, config_from_dict, config_to_dict, opt, parse_args, split_argv

HERE = Path(__file__).resolve().parent.parent  # the repository root
KEYS = [f.name for f in dataclasses.fields(TrainConfig)]


def run_cli(*argv):
    """parse_args in a fresh interpreter, as a user meets it: returns (exit status, stdout, stderr)."""
    code = "import sys, configurable; print(configurable.parse_args(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, *argv], cwd=HERE, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def error_of(argv, capsys, **kwargs):
    """parse_args must exit 2 with exactly one stderr line `error: ...`; returns that line."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv, **kwargs)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_arguments_gives_the_defaults():
    assert parse_args([]) == TrainConfig()


def test_override_parsed_by_type():
    cfg = parse_args(["--max_iters=20", "--learning_rate=3e-4", "--compile=false", "--attn=sigmoid", "--out_dir=x"])
    assert (cfg.max_iters, cfg.learning_rate, cfg.compile, cfg.attn, cfg.out_dir) == (20, 3e-4, False, "sigmoid", "x")
    assert type(cfg.max_iters) is int and type(cfg.learning_rate) is float


def test_space_separated_value_and_negative_number():
    cfg = parse_args(["--max_iters", "20", "--sigmoid_bias", "-5.5", "--beta2", "-0.5"])
    assert (cfg.max_iters, cfg.sigmoid_bias, cfg.beta2) == (20, "-5.5", -0.5)


def test_dashes_in_key_mean_underscores():
    assert parse_args(["--max-iters=7", "--lr-decay-iters", "7"]).lr_decay_iters == 7


def test_dropout_zero_is_a_float():
    cfg = parse_args(["--dropout=0"])
    assert cfg.dropout == 0.0 and type(cfg.dropout) is float


@pytest.mark.parametrize("text,value", [(t, True) for t in ["true", "True", "1", "yes", "on", "ON"]]
                         + [(t, False) for t in ["false", "False", "0", "no", "off", "OFF"]])
def test_bool_spellings(text, value):
    assert parse_args([f"--compile={text}"]).compile is value
    assert parse_args(["--compile", text]).compile is value


def test_bare_bool_key_means_true():
    assert parse_args(["--compile=false", "--eval_only", "--compile"]) == TrainConfig(compile=True, eval_only=True)


def test_auto_bool_keys_take_true_false_or_auto(tmp_path, capsys):
    """hybrid_norm and layerscale default to auto (None: on for sigmoid, off for softmax)."""
    assert TrainConfig().hybrid_norm is None and parse_args(["--hybrid_norm=auto"]).hybrid_norm is None
    assert parse_args(["--hybrid_norm"]).hybrid_norm is True  # bare, as a bool key
    assert parse_args(["--hybrid_norm", "off", "--layerscale=yes"]) == TrainConfig(hybrid_norm=False, layerscale=True)
    preset = write(tmp_path, "p.toml", 'hybrid_norm = true\nlayerscale = "auto"\n')
    assert parse_args([preset]) == TrainConfig(hybrid_norm=True, layerscale=None)
    assert error_of(["--hybrid_norm=maybe"], capsys) == "error: --hybrid_norm expects true, false or auto, got 'maybe'"
    bad = write(tmp_path, "bad.toml", "layerscale = 1\n")
    assert "layerscale expects true, false or auto" in error_of([bad], capsys)
    assert config_from_dict(TrainConfig, config_to_dict(TrainConfig())) == TrainConfig()  # None survives a checkpoint


def test_later_override_wins():
    assert parse_args(["--max_iters=1", "--max_iters=2"]).max_iters == 2


def test_unknown_key_suggests_close_match():
    status, out, err = run_cli("--learnig_rate=1e-3")
    assert status == 2 and out == ""
    assert err == "error: unknown config key 'learnig_rate'; did you mean 'learning_rate'?\n"
    assert "Traceback" not in err


def test_unknown_key_without_close_match_points_to_help(capsys):
    assert "see --help" in error_of(["--zzzzzz=1"], capsys)


def test_bad_value_names_expected_type(capsys):
    assert error_of(["--dropout=abc"], capsys) == "error: --dropout expects a float, got 'abc'"
    assert error_of(["--max_iters=1.5"], capsys) == "error: --max_iters expects an int, got '1.5'"
    assert error_of(["--compile=maybe"], capsys) == "error: --compile expects true or false, got 'maybe'"
    assert "finite" in error_of(["--learning_rate=nan"], capsys)


def test_bad_choice_lists_choices(capsys):
    assert error_of(["--attn=sigmoidd"], capsys) == "error: --attn expects one of softmax, sigmoid; got 'sigmoidd'"


def test_missing_value_and_stray_argument_are_one_line_errors(capsys):
    assert "--max_iters needs a value" in error_of(["--max_iters"], capsys)
    assert "unexpected argument 'presets/x.yaml'" in error_of(["presets/x.yaml"], capsys)


def test_every_preset_in_the_repo_loads():
    presets = sorted(HERE.glob("presets/*.toml"))
    assert len(presets) >= 4
    for path in presets:
        assert path.read_text().startswith("# "), f"{path.name} needs a one-line comment saying what it is"
        parse_args([str(path)])


def test_preset_then_override_order(tmp_path):
    a = write(tmp_path, "a.toml", "max_iters = 10\nn_layer = 2\nout_dir = 'a'\n")
    b = write(tmp_path, "b.toml", "max_iters = 20\n")
    cfg = parse_args([a, "--n_layer=3", b])  # overrides apply after all presets wherever they appear
    assert (cfg.max_iters, cfg.n_layer, cfg.out_dir) == (20, 3, "a")
    assert split_argv([a, "--n_layer=3", b]) == ([a, b], [("n_layer", "3")])


def test_default_presets_apply_only_when_no_preset_given(tmp_path):
    default = write(tmp_path, "default.toml", "max_iters = 10\nn_layer = 2\n")
    mine = write(tmp_path, "mine.toml", "max_iters = 20\n")
    assert parse_args(["--n_layer=3"], default_presets=[default]) == TrainConfig(max_iters=10, n_layer=3)
    assert parse_args([mine], default_presets=[default]) == TrainConfig(max_iters=20)


def test_toml_values_are_type_checked(tmp_path, capsys):
    ok = write(tmp_path, "ok.toml", 'dropout = 0\nlearning_rate = "1e-3"\ncompile = false\n')
    cfg = parse_args([ok])
    assert cfg.dropout == 0.0 and type(cfg.dropout) is float and cfg.learning_rate == 1e-3 and cfg.compile is False
    for line, message in [("max_iters = 5000.0", "max_iters expects an int, got 5000.0"),
                          ("max_iters = true", "max_iters expects an int, got True"),
                          ("compile = 1", "compile expects true or false, got 1"),
                          ("sigmoid_bias = -5.5", "sigmoid_bias expects a string, got -5.5; write it in quotes"),
                          ("n_layer = [1, 2]", "n_layer expects an int, got [1, 2]")]:
        bad = write(tmp_path, "bad.toml", line + "\n")
        assert error_of([bad], capsys) == f"error: {bad}: {message}"


def test_missing_preset_file(capsys):
    assert error_of(["presets/nope.toml"], capsys) == "error: preset file 'presets/nope.toml' not found"


def test_bad_toml(tmp_path, capsys):
    bad = write(tmp_path, "bad.toml", "max_iters = \n[[[\n")
    assert error_of([bad], capsys).startswith(f"error: {bad} is not valid TOML: ")


def test_unquoted_string_in_preset_says_to_add_quotes(tmp_path, capsys):
    bad = write(tmp_path, "bad.toml", "max_iters = 10\nattn = sigmoid  # the kind\n")
    assert error_of([bad], capsys) == (f"error: {bad} is not valid TOML: Invalid value (at line 2, column 8); "
                                       'a string needs quotes: attn = "sigmoid"')


def test_unknown_key_in_preset_names_file(tmp_path, capsys):
    bad = write(tmp_path, "bad.toml", "n_layers = 4\n")
    assert error_of([bad], capsys) == f"error: {bad}: unknown config key 'n_layers'; did you mean 'n_layer'?"
    nested = write(tmp_path, "nested.toml", "[model]\nn_layer = 4\n")
    assert error_of([nested], capsys).endswith("remove the [model] table header")


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--max_iters=1", "--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    key_lines = [line for line in lines if line.startswith("  --")]
    assert [line.split("=")[0].strip("- ") for line in key_lines] == KEYS  # one line each, declaration order
    for line, f in zip(key_lines, dataclasses.fields(TrainConfig)):
        shown = "auto" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        assert f"(default: {shown})" in line and f.metadata["help"] in line
    assert any(line.startswith("  --attn=<str> (default: softmax) attention kind; the default sigmoid is the paper's recipe")
               and line.endswith("[choices: softmax|sigmoid]") for line in lines)


def test_config_round_trips_through_dict():
    cfg = parse_args(["--attn=sigmoid", "--dropout=0", "--compile=false", "--sigmoid_bias=learnable"])
    d = config_to_dict(cfg)
    assert d["attn"] == "sigmoid" and config_from_dict(TrainConfig, d) == cfg
    assert config_from_dict(TrainConfig, {"n_layer": 2}) == TrainConfig(n_layer=2)  # older checkpoints: defaults


def test_config_from_dict_raises_config_error():
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'"):
        config_from_dict(TrainConfig, {"n_layers": 2})
    with pytest.raises(ConfigError, match="n_layer expects an int"):
        config_from_dict(TrainConfig, {"n_layer": 2.5})


def test_config_text_is_never_executed(tmp_path):
    marker = tmp_path / "X"
    payload = f"__import__('os').system('touch {marker}')"
    preset = write(tmp_path, "evil.toml", f'out_dir = "{payload}"\n')
    status, out, err = run_cli(preset, f"--wandb_run_name={payload}")
    assert status == 0 and payload in out  # just strings
    status, out, err = run_cli(f"--max_iters={payload}")
    assert status == 2 and err.startswith("error: --max_iters expects an int")
    assert not marker.exists()
    calls = {n.func.id for n in ast.walk(ast.parse(Path(configurable.__file__).read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"exec", "eval", "compile", "__import__"}


@dataclass
class SampleConfig:  # what sample.py declares; its annotations are strings (see the __future__ import)
    num_samples: int = opt(10, "samples to draw")
    temperature: float = opt(0.8, "softmax temperature")


def test_works_for_another_config_class_with_string_annotations(capsys):
    cfg = parse_args(["--num-samples=3", "--temperature=1"], SampleConfig, prog="sample.py")
    assert (cfg.num_samples, cfg.temperature) == (3, 1.0) and type(cfg.temperature) is float
    assert error_of(["--max_iters=3"], capsys, config_cls=SampleConfig).startswith("error: unknown config key")
    with pytest.raises(SystemExit):
        parse_args(["-h"], SampleConfig, prog="sample.py", description="Sample from a trained model.")
    out = capsys.readouterr().out
    assert out.startswith("usage: sample.py") and "  --temperature=<float> (default: 0.8) softmax temperature" in out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=12), st.text(max_size=12)), max_size=5))
def test_random_argv_gives_config_or_one_line_error(pairs):
    argv = [f"--{key}={value}" for key, value in pairs]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            assert isinstance(parse_args(argv), TrainConfig)
            assert err.getvalue() == ""
        except SystemExit as e:
            assert e.code == 2
            assert len(err.getvalue().splitlines()) == 1 and err.getvalue().startswith("error: ")
