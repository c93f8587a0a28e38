"""RunConfig: presets, TOML, flags, and one-line errors naming the field."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from ttt_runtime.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    RunConfig,
    TTTLayerConfig,
    parse_run_args,
)
from ttt_runtime.launch import check_run_args


def test_default_preset_is_the_documented_model():
    config = RunConfig.from_preset("default")
    assert (config.mode, config.layer_type) == ("train", "linear")
    assert (config.num_blocks, config.hidden_size, config.num_heads) == (4, 256, 4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    assert RunConfig.from_preset(name).preset == name


def test_tiny_is_smaller_than_default():
    tiny, default = RunConfig.from_preset("tiny"), RunConfig.from_preset("default")
    assert tiny.hidden_size * tiny.num_blocks < default.hidden_size * default.num_blocks


def test_precedence_preset_then_toml_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nseq_len = 48\nlr = 0.01\ndata = "/tmp"\n')
    args, config = parse_run_args(["--config", str(toml), "--lr", "0.02", "--mode", "adapt"])
    assert config.preset == "tiny" and config.hidden_size == PRESETS["tiny"]["hidden_size"]
    assert (config.seq_len, config.lr, config.mode, config.data) == (48, 0.02, "adapt", "/tmp")
    # --preset on the command line wins over the file's preset
    _, config = parse_run_args(["--config", str(toml), "--preset", "mlp"])
    assert config.layer_type == "mlp" and config.seq_len == 48


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--seq-len", "0"], "seq_len"),
        (["--seq-len", "many"], "seq_len"),
        (["--mode", "dream"], "mode"),
        (["--layer-type", "conv"], "layer_type"),
        (["--num-heads", "3"], "num_heads"),
        (["--hidden-size", "12", "--num-heads", "4"], "hidden_size"),
        (["--lr", "-1"], "lr"),
        (["--lr", "nan"], "lr"),
        (["--use-gate", "maybe"], "use_gate"),
        (["--preset", "huge"], "preset"),
        (["--exact-accumulate", "true"], "exact_accumulate"),
        (["--max-steps", "-2"], "max_steps"),
        (["--max-steps", "inf"], "max_steps"),
        (["--sample-every", "nan"], "sample_every"),
        (["--seed", str(2**32)], "seed"),
        (["--num-blocks", str(2**31)], "num_blocks"),
        (["--ttt-base-lr", "inf"], "ttt_base_lr"),
        (["--weight-decay", "nan"], "weight_decay"),
    ],
)
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b") as info:
        parse_run_args(argv)
    assert "\n" not in str(info.value)


def test_toml_errors_name_the_key_or_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seq_len = 'long'\n")
    with pytest.raises(ConfigError, match="seq_len='long': must be an integer"):
        RunConfig.from_toml(str(bad))
    bad.write_text("sequence_length = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'sequence_length'; did you mean"):
        RunConfig.from_toml(str(bad))
    bad.write_text("seq_len = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(str(bad))
    with pytest.raises(ConfigError, match="missing.toml: no such file"):
        RunConfig.from_toml(str(tmp_path / "missing.toml"))


def test_integer_ranges_include_their_ends():
    assert RunConfig(seed=2**32 - 1).seed == 2**32 - 1
    assert RunConfig(max_steps=2**31 - 1).max_steps == 2**31 - 1
    with pytest.raises(ConfigError, match=r"^seed=-1: must be an integer from 0 to 4294967295$"):
        RunConfig(seed=-1)


def test_non_finite_numbers_say_finite():
    with pytest.raises(ConfigError, match=r"^weight_decay=inf: must be a finite number >= 0$"):
        RunConfig(weight_decay=math.inf)


def test_toml_that_is_too_deep_or_too_long_is_a_config_error(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("seq_len = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(str(deep))
    deep.write_text("seed = " + "9" * 5000 + "\n")  # beyond int()'s digit limit
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(str(deep))


def test_check_run_args_catches_missing_paths(tmp_path):
    assert check_run_args(["--preset", "tiny"]) is None
    assert "no such file" in check_run_args(["--resume", str(tmp_path / "nope.safetensors")])
    nope = tmp_path / "nope"
    assert check_run_args(["--data", str(nope)]) == f"data path {nope} does not exist"
    assert check_run_args(["--bogus"]).startswith("unrecognized arguments")


def test_ttt_run_refuses_bad_input_before_it_starts(unusable_run_inputs, tmp_path):
    socket = tmp_path / "s"  # never made: the run must not start
    empty_data, empty_folder = tmp_path / "empty_data.toml", tmp_path / "empty_folder.toml"
    empty_data.write_text('data = ""\n')  # streamed the current folder, as --data '' did
    empty_folder.write_text('checkpoint_dir = ""\n')
    long_folder = tmp_path / "long_folder.toml"  # its hello was too long for any monitor
    long_folder.write_text(f'checkpoint_dir = "{"c" * 300_000}"\n')
    for args, needle in unusable_run_inputs + [
        (["--config", str(empty_data)], "data='': must be a non-empty string"),
        (["--config", str(empty_folder)], "checkpoint_dir='': must be a non-empty string"),
        (
            ["--config", str(long_folder)],
            f"checkpoint_dir='{'c' * 40}...': must be a non-empty string of at most 4096 bytes",
        ),  # fmt: skip
        (["--max-steps", "inf"], "max_steps='inf': must be an integer"),
        (["--lr", "inf"], "lr=inf: must be a positive finite number"),
        (["--weight-decay", "nan"], "weight_decay=nan: must be a finite number >= 0"),
        # its weights would outgrow the machine: MLX's allocator ended the run with a segfault
        (
            ["--hidden-size", "1000000"],
            "hidden_size=1000000, num_blocks=2, intermediate_size=64: "
            "the model's weights alone are 33,531.0 GiB, more than this machine's",
        ),
    ]:
        command = [sys.executable, "-m", "ttt_runtime", "run", "--preset", "tiny", *args]
        result = subprocess.run([*command, "--socket", str(socket)], capture_output=True,
                                text=True, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
        assert not socket.exists()


LAYER = dict(hidden_size=32, num_heads=4, mini_batch_size=8, ttt_base_lr=1.0, use_gate=False)


@pytest.mark.parametrize(
    ("layer_bad", "model_bad"),
    [
        ({"num_heads": 3}, {}),
        ({"hidden_size": 12}, {}),
        ({"hidden_size": 2**31, "num_heads": 1}, {}),
        ({"mini_batch_size": 0}, {}),
        ({"ttt_base_lr": math.inf}, {}),
        ({"use_gate": "yes"}, {}),
        ({}, {"num_blocks": 0}),
        ({}, {"intermediate_size": 2**31}),
        ({}, {"layer_type": "conv"}),
    ],
)
def test_a_model_setting_is_refused_by_the_run_as_by_the_model(layer_bad, model_bad):
    """One rule, one message: the run's model settings are checked by the model's own rules."""
    with pytest.raises(ConfigError) as by_run:
        RunConfig().with_overrides(**{**LAYER, **layer_bad, **model_bad})
    with pytest.raises(ConfigError) as by_model:
        ModelConfig(TTTLayerConfig(**{**LAYER, **layer_bad}), **model_bad)
    assert str(by_run.value) == str(by_model.value)
    assert "\n" not in str(by_run.value)


def test_the_model_is_the_run_settings_of_the_same_names():
    layer_settings = dict(hidden_size=48, num_heads=3, mini_batch_size=5, ttt_base_lr=0.5)
    config = RunConfig(mode="adapt", layer_type="mlp", num_blocks=3, intermediate_size=70,
                       use_gate=True, **layer_settings)  # fmt: skip
    layer = TTTLayerConfig(use_gate=True, **layer_settings)
    assert config.model_config() == ModelConfig(layer, "mlp", num_blocks=3, intermediate_size=70)
    # train mode compiles each whole step instead of each layer's scan; no compile: neither
    for mode, compile, layers_compile in [("train", True, False), ("adapt", False, False)]:
        model = RunConfig(mode=mode, compile=compile).model_config()
        assert model.layer.compile is layers_compile


def test_an_integer_too_large_for_a_number_setting_is_refused(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("lr = 1" + "0" * 400 + "\n")  # not a float: math.isfinite overflowed
    with pytest.raises(ConfigError, match=r"^lr=10+: must be a positive finite number$"):
        RunConfig.from_toml(str(toml))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--hidden-size", "64", "--num-heads", "2"], "hidden_size=32; hidden_size=64"),
        (["--num-blocks", "3"], "num_blocks=2; num_blocks=3"),
        (["--layer-type", "mlp"], "layer_type='linear'; layer_type='mlp'"),
        (["--use-gate", "true"], "use_gate=False; use_gate=True"),
        (["--num-heads", "4"], "num_heads=2; num_heads=4"),
        (["--mini-batch-size", "4"], "mini_batch_size=8; mini_batch_size=4"),
        (["--preset", "default"], "num_blocks=2; num_blocks=4"),
        (["--batch-size", "2"], "batch_size=1; batch_size=2"),  # an adapt run's caches
    ],
)
def test_resuming_with_settings_that_change_the_model_shapes_is_one_line(tmp_path, flags, needle):
    from ttt_runtime.checkpoint import Checkpoint, save

    saved = RunConfig.from_preset("tiny").with_overrides(mode="adapt").as_dict()
    path = save(str(tmp_path / "c.safetensors"), Checkpoint({}, saved, 3, 96, 96, 0, [0, 0]))
    socket = tmp_path / "s"  # never made: the run must not start
    command = [sys.executable, "-m", "ttt_runtime", "run", "--socket", str(socket)]
    result = subprocess.run([*command, "--resume", path, *flags], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"checkpoint {path} was saved with {needle}" in lines[0], lines[0]
    assert not socket.exists()
    # what does not change a shape may change: the learning rates, the length of a row
    assert check_run_args(["--resume", path, "--lr", "0.01", "--seq-len", "16"]) is None
    assert check_run_args(["--resume", path, "--mode", "train", "--batch-size", "2"]) is None
