import re
import pytest

from base import UserError
from harness.config import PRESETS, Config, config_from_dict, load_config, validate


def test_preset_env_flag_priority():
    cfg = load_config(["--preset", "speedrun", "--num_layers", "3"],
                      env={"NUM_LAYERS": "5", "MODEL_DIM": "384", "COOLDOWN_FRAC": "0.4"})
    assert cfg.preset == "speedrun"
    assert cfg.num_layers == 3  # flag beats env
    assert cfg.model_dim == 384  # env beats preset
    assert cfg.cooldown_frac == 0.4
    assert cfg.seq_len == 2048  # from the preset
    assert cfg.batch_sizes == [131072, 262144, 393216, 393216]
    assert cfg.lr_muls == [1.0, 1.52, 1.73, 1.0]
    assert (cfg.num_scheduled_iterations, cfg.num_extension_iterations) == (1560, 40)


def test_preset_from_env_and_lists(capsys):
    env = {"PRESET": "speedrun", "BATCH_SIZES": "131072,262144,393216,393216", "LR_MULS": "1,1.52,1.73,1",
           "SPECTRAL_LR_MUL": "0.5", "RUN_ID": "abc-1"}
    cfg = load_config([], env=env, overrides={"ord": True})
    assert cfg.preset == "speedrun" and cfg.spectral_lr_mul == 0.5 and cfg.run_id == "abc-1"
    assert cfg.lr_muls == [1.0, 1.52, 1.73, 1.0]
    # the standard script leaves ORD's variables alone (one shell drives both scripts), and says so
    std = load_config([], env=env)
    assert std.spectral_lr_mul is None and std.run_id == "abc-1"
    assert "env SPECTRAL_LR_MUL ignored" in capsys.readouterr().err


def test_ord_defaults_and_standard_run_records_no_multiplier():
    assert load_config([], env={}).spectral_lr_mul is None
    ord_cfg = load_config([], env={}, overrides={"ord": True})
    assert (ord_cfg.spectral_lr_mul, ord_cfg.ord_form, ord_cfg.ord_units, ord_cfg.ord_placement) == (
        1.0, "interpolated", "fork", "after_norm")
    with pytest.raises(UserError, match="spectral_lr_mul=0.5 is invalid: an ORD option of train_gpt_muon_new.py"):
        load_config(["--spectral_lr_mul", "0.5"], env={})
    with pytest.raises(UserError, match="ord_form='projected' is invalid: an ORD option"):
        load_config(["--ord_form", "projected"], env={})


def test_bool_flags_and_optional():
    cfg = load_config(["--ord_reproject", "--normuon", "0", "--spectral_lr_mul_attn", "0.3"], env={},
                      overrides={"ord": True})
    assert cfg.ord_reproject is True and cfg.normuon is False and cfg.spectral_lr_mul_attn == 0.3
    assert cfg.spectral_lr_mul_mlp is None


def test_adam_overrides_parse_and_validate():
    cfg = load_config(["--adam_overrides", "embed.lr_mul=10,*.beta1=0.7"], env={})
    assert cfg.adam_overrides == {"embed.lr_mul": 10.0, "*.beta1": 0.7}
    assert load_config(["--adam_overrides", ""], env={}).adam_overrides == {}
    for text, needle in (("embed.lr=1", "adam_overrides='embed.lr' is invalid: keys are LABEL.KEY"),
                         ("head.lr_mul=1", "adam_overrides='head.lr_mul'"),
                         ("embed.beta1=1.0", "betas must be in [0, 1)"),
                         ("embed.lr_mul", "not a comma-separated list of KEY=VALUE")):
        with pytest.raises(UserError, match=re.escape(needle)):
            load_config(["--adam_overrides", text], env={})


def test_torchrun_variables_are_not_config():
    cfg = load_config([], env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert cfg == load_config([], env={})


@pytest.mark.parametrize(
    "argv, env, needle",
    [
        ([], {"BATCH_SIZES": "12,,x"}, "BATCH_SIZES"),
        ([], {"BATCH_SIZES": "2048,x,1,1"}, "is not an integer"),
        (["--preset", "huge"], {}, "preset='huge' is unknown"),
        ([], {"PRESET": "huge"}, "preset='huge'"),
        (["--run_id", "a/b"], {}, "run_id='a/b'"),
        (["--run_id", "x..y"], {}, "no '..'"),
        (["--num_layers", "0"], {}, "num_layers=0"),
        (["--cooldown_frac", "1.5"], {}, "cooldown_frac=1.5"),
        (["--ns_method", "svd"], {}, "polar_express or quintic"),
        (["--batch_sizes", "2048,4096"], {}, "four values"),
        (["--batch_sizes", "100,256,256,256"], {}, "multiple of seq_len=256"),
        (["--adam_every", "3"], {}, "adam_every=3"),
        (["--bogus", "1"], {}, "unknown argument '--bogus'"),
        (["--normuon", "maybe"], {}, "is not a boolean"),
    ],
)
def test_bad_values_are_one_line_errors(argv, env, needle):
    with pytest.raises(UserError) as e:
        load_config(argv, env=env)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--spectral_lr_mul", "-1"], "spectral_lr_mul=-1.0"),
        (["--spectral_lr_mul", "nan"], "spectral_lr_mul=nan"),
        (["--ord_placement", "middle"], "after_norm or before_norm"),
        (["--ord_form", "branching"], "interpolated or projected"),
        (["--ord_units", "sum"], "fork or mean"),
    ],
)
def test_bad_ord_values_are_one_line_errors(argv, needle):
    with pytest.raises(UserError) as e:
        load_config(argv, env={}, overrides={"ord": True})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_world_size_divisibility():
    cfg = load_config([], env={})
    validate(cfg, world_size=2)
    with pytest.raises(UserError, match=r"divisible by world_size x seq_len = 3 x 256"):
        validate(cfg, world_size=3)


def test_round_trip_dict():
    cfg = load_config(["--preset", "speedrun", "--tag", "t1"], env={})
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown config field 'nope'"):
        config_from_dict({**cfg.to_dict(), "nope": 1})


def test_presets_are_valid():
    for name in PRESETS:
        validate(load_config(["--preset", name], env={}))
    assert Config().preset == "tiny"


# --- self-documenting flags (issue 18) ---------------------------------------------------------


def _help(prog):
    import contextlib
    import io

    from harness.config import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(prog).parse_args(["--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines: compare on single spaces


def test_every_field_has_help_and_default():
    from harness.config import ENTRY_FIELDS, ORD_FIELDS, field_docs, field_names

    docs = field_docs()
    text = _help("train_gpt_muon_new.py")
    for name in field_names():
        if name in ENTRY_FIELDS:
            assert f"--{name} " not in text, name
            continue
        assert docs[name] and len(docs[name]) > 8, name
        assert f"--{name} " in text, name
    # help and default come from the dataclass: its comment, its default, the presets' values
    assert "--muon_lr MUON_LR Muon's base learning rate (default 0.05; speedrun preset 0.023)" in text
    assert "--normuon_beta2 NORMUON_BETA2 NorMuon's second-moment decay (default 0.95)" in text
    assert "--batch_sizes BATCH_SIZES tokens per step over all ranks, per batch-size stage (4 stages) (default " \
           "2048,4096,4096,4096; classic preset 2048,2048,2048,2048; micro preset 32,32,32,32; speedrun preset 131072,262144,393216,393216)" in text
    assert "ORD (train_gpt_muon_new.py):" in text and "Orthogonal-Radial Decomposition" in text
    # the standard script refuses ORD flags, so it does not offer them
    std = _help("train_gpt.py")
    assert all(f"--{name} " not in std for name in ORD_FIELDS) and "--muon_lr " in std


def test_entry_script_fields_are_neither_flags_nor_env():
    with pytest.raises(UserError, match="unknown argument '--ord'"):
        load_config(["--ord", "1"], env={})
    with pytest.raises(UserError, match="unknown argument '--script'"):
        load_config(["--script", "x.py"], env={})
    cfg = load_config([], env={"ORD": "1", "SCRIPT": "x.py", "SEED": "4"})
    assert cfg.ord is False and cfg.script == "" and cfg.seed == 4


def test_config_env_lists_what_the_environment_set():
    from harness.config import config_env

    env = {"SEED": "3", "DTYPE": "float32", "RANK": "0", "PRESET": "tiny", "SPECTRAL_LR_MUL": "0.5", "HOME": "/x"}
    assert config_env(env, ord_on=False) == {"SEED": "3", "DTYPE": "float32"}
    assert config_env(env, ord_on=True) == {"SEED": "3", "DTYPE": "float32", "SPECTRAL_LR_MUL": "0.5"}
