"""Your own recipe: `ldm config` prints a run config, `--config FILE` reads it back onto a
preset and `--set KEY=VALUE` changes one value; every mistake is one `error:` line, exit 2,
before the run directory exists."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from latentdiffusion.cli import main
from latentdiffusion.cli.options import run_config
from latentdiffusion.cli.parser import build_parser
from latentdiffusion.diffusion.schedule import ScheduleConfig
from latentdiffusion.errors import UsageError
from latentdiffusion.models.unet import UNetConfig
from latentdiffusion.run import recipe
from latentdiffusion.run.config import FLOW_LOGIT_STD, RunConfig
from latentdiffusion.run.presets import preset
from latentdiffusion.schema import config_hash, to_dict
from test_cli_errors import CPU, assert_fails, ldm

R = dataclasses.replace


def config_of(*argv: str | Path) -> RunConfig:
    """The config `ldm run argv` would run."""
    return run_config(build_parser().parse_args(["run", *map(str, argv)]))


def leaves(obj: Any, path: str = "") -> dict[str, Any]:
    """{dotted key: value} of every non-dataclass field."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        out.update(leaves(value, key + ".") if dataclasses.is_dataclass(value)
                   else {key: value})
    return out


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = ldm(capsys, "config", *argv)
    assert code == 0 and err == "", err
    return out


# ---------------------------------------------------------------- round trip


FLAGS = [("tiny",), ("quick",), ("default",), ("default", "--conditional"),
         ("default", "--objective", "flow")]


@pytest.mark.parametrize("fmt", ["toml", "json"])
@pytest.mark.parametrize("flags", FLAGS, ids=" ".join)
def test_printed_config_reads_back_identically(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path, flags: tuple[str, ...],
                                               fmt: str) -> None:
    expected = config_of("--preset", *flags)
    text = printed(capsys, "--preset", *flags, "--format", fmt)
    path = tmp_path / f"cfg.{fmt}"
    path.write_text(text)
    # The file is complete: read onto another preset it gives the one it was printed from.
    other = "tiny" if flags[0] != "tiny" else "default"
    got = config_of("--config", path, "--preset", other)
    assert got == expected
    assert config_hash(got) == config_hash(expected)  # also tells 1 from 1.0
    assert {k: type(v) for k, v in leaves(got).items()} == {
        k: type(v) for k, v in leaves(expected).items()}
    if flags[1:] == ("--conditional",):
        assert got.unet.num_classes == 10 and got.sampling.labels == "balanced"


def test_objective_flow_brings_the_flow_time_density(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    """--objective flow switches a VP preset to flow with its logit-normal std (0.5); --set
    comes after it, and a config that is flow already keeps its own."""
    flow = config_of("--preset", "default", "--objective", "flow").objective
    assert (flow.kind, flow.logit_std) == ("flow", FLOW_LOGIT_STD) and FLOW_LOGIT_STD != 1.0
    assert config_of("--preset", "default", "--objective", "vp") == preset("default")
    assert config_of("--preset", "default", "--objective", "flow", "--set",
                     "objective.logit_std=1.0").objective.logit_std == 1.0
    path = tmp_path / "flow.toml"
    path.write_text(printed(capsys, "--preset", "default", "--objective", "flow", "--set",
                            "objective.logit_std=0.8"))
    assert config_of("--config", path, "--objective", "flow").objective.logit_std == 0.8
    back = config_of("--config", path, "--objective", "vp").objective
    assert back == preset("default").objective  # the VP preset's key again


def test_toml_layout(capsys: pytest.CaptureFixture[str]) -> None:
    text = printed(capsys, "--preset", "quick", "--seed", "3")
    lines = text.splitlines()
    assert lines[0] == "# ldm config --preset quick --seed 3; run it with: ldm run --config FILE"
    config = preset("quick")
    nested = [f.name for f in dataclasses.fields(config)
              if dataclasses.is_dataclass(getattr(config, f.name))]
    first_section = next(i for i, line in enumerate(lines) if line.startswith("["))
    top = [line.split(" = ")[0] for line in lines[1:first_section] if " = " in line]
    assert top == [f.name for f in dataclasses.fields(config) if f.name not in nested]
    assert {"latent_mode", "eval_samples"} <= set(top)
    assert [line for line in lines if line.startswith("[")] == [f"[{n}]" for n in nested]
    assert {"[classifier]", "[unet]", "[diffusion_train]", "[sampling]"} <= set(lines)
    assert 'samplers = ["ddpm-20"]' in lines and "channels = [8, 16]" in lines
    assert "seed = 3" in lines and "seed = 4" in lines  # --seed 3: the sets' seed is 4
    assert json.loads(printed(capsys, "--preset", "quick", "--format", "json")) == json.loads(
        json.dumps(to_dict(preset("quick"))))  # (tuples as lists)


@pytest.mark.parametrize("text", ["plain", 'a "quote" and a \\ backslash', "tab\tnew\nline",
                                  "\x00\x1f\x7f", "ünïcödé ✓ 😀", ""])
def test_toml_strings_read_back(text: str) -> None:
    assert recipe.tomllib.loads(f"x = {recipe._toml_value(text)}")["x"] == text


@pytest.mark.parametrize("value", [1e-4, 1e-05, 0.1 + 0.2, 1.0, 1e16, 123456789.123456789,
                                   5e-324, 1.7976931348623157e308])
def test_toml_floats_read_back_identically(value: float) -> None:
    got = recipe.tomllib.loads(f"x = {recipe._toml_value(value)}")["x"]
    assert type(got) is float and got == value


# A config tree of every kind of field, two sections deep: the module knows no field names.
@dataclass(frozen=True)
class Inner:
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ("x",)


@dataclass(frozen=True)
class Middle:
    scale: float = 0.5
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise UsageError(f"Middle.scale must be >= 0, got {self.scale}")


@dataclass(frozen=True)
class Outer:
    size: int = 1
    sizes: tuple[int, ...] = (1, 2)
    middle: Middle = field(default_factory=Middle)


def test_any_config_tree_round_trips(tmp_path: Path) -> None:
    config = Outer(size=3, sizes=(), middle=Middle(scale=2.0, inner=Inner(
        flag=True, mode="b", names=("p", "q"))))
    text = recipe.dumps(config, header="made\nhere\t")
    assert text.splitlines()[:2] == ["# made\\nhere\\t", ""]
    assert "[middle.inner]" in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert recipe.load(path, Outer()) == config
    assert recipe.apply_sets(Outer(), ["middle.inner.flag=true", "middle.inner.mode=b",
                                       "middle.inner.names=p, q", "sizes=4,5", "size=7",
                                       "middle.scale=3"]) == Outer(
        size=7, sizes=(4, 5), middle=Middle(scale=3.0, inner=Inner(True, "b", ("p", "q"))))
    with pytest.raises(UsageError, match=r"^--set middle.inner.flag: expected true or false, "
                                         r"got 'yes'$"):
        recipe.apply_sets(Outer(), ["middle.inner.flag=yes"])
    with pytest.raises(UsageError, match=r"^--set middle.scale: Middle.scale must be >= 0"):
        recipe.apply_sets(Outer(), ["middle.scale=-1"])
    path.write_text("[middle.inner]\nflag = 1\n")
    with pytest.raises(UsageError, match=r"c.toml: middle.inner.flag: expected true or false, "
                                         r"got 1$"):
        recipe.load(path, Outer())


# ---------------------------------------------------------------- --set and partial files


def test_set_each_type_of_value() -> None:
    base = preset("quick")
    got = config_of("--preset", "quick", "--conditional",
                    "--set", "unet.channels=64,96",  # tuple[int, ...]
                    "--set", "diffusion_train.lr=4e-3",  # float
                    "--set", "sampling.guidance=2",  # float written as an integer
                    "--set", "eval_samples=2000",  # int
                    "--set", "sampling.samplers=ddpm-20, ddim-50",  # tuple[str, ...]
                    "--set", "schedule.kind=cosine",  # Literal
                    "--set", "sampling.labels=7",  # str
                    "--set", "eval_samples=1500")  # a later --set wins
    assert got.unet.channels == (64, 96)
    assert got.diffusion_train.lr == 4e-3
    assert got.sampling.guidance == 2.0 and type(got.sampling.guidance) is float
    assert got.eval_samples == 1500
    assert got.sampling.samplers == ("ddpm-20", "ddim-50")
    assert got.schedule.kind == "cosine" and got.sampling.labels == "7"
    untouched = {k: v for k, v in leaves(got).items()
                 if k not in {"unet.channels", "diffusion_train.lr", "sampling.guidance",
                              "eval_samples", "sampling.samplers", "schedule.kind",
                              "sampling.labels", "unet.num_classes", "guide.channels",
                              "guide.steps", "sampling.autoguidance"}}
    assert untouched == {k: v for k, v in leaves(base).items() if k in untouched}
    # --conditional swaps the preset's guide for classifier-free guidance
    assert got.guide.channels == () and got.sampling.autoguidance == 1.0


def test_set_comes_after_the_options_and_may_change_agreeing_values_together() -> None:
    got = config_of("--preset", "tiny", "--seed", "5", "--set", "diffusion_train.seed=9")
    assert (got.vae_train.seed, got.diffusion_train.seed, got.sampling.seed) == (5, 9, 6)
    got = config_of("--preset", "tiny", "--set", "vae.latent_channels=3",
                    "--set", "unet.in_channels=3")
    assert got.vae.latent_channels == got.unet.in_channels == 3


def test_partial_file_keeps_the_presets_other_values(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("eval_samples = 500\n[diffusion_train]\nlr = 1\n[sampling]\nseed = 42\n")
    for name in ("quick", "default"):
        base = preset(name)
        expected = R(base, eval_samples=500, diffusion_train=R(base.diffusion_train, lr=1.0),
                     sampling=R(base.sampling, seed=42))
        got = config_of("--preset", name, "--config", path)
        assert got == expected and config_hash(got) == config_hash(expected)
    assert config_of("--config", path) == config_of("--preset", "default", "--config", path)
    # The options apply after the file: --seed 3 gives the sets seed 4, not the file's 42.
    assert config_of("--config", path, "--seed", "3").sampling.seed == 4


# ---------------------------------------------------------------- errors


def has(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


UNET, TOP = has(UNetConfig), has(RunConfig)
# (file name, its text or None, --set items, the error line after "error: "; "..." at the end:
# the rest is the parser's own words)
ERRORS = [
    (None, None, ["diffusion_train.lr=abc"],
     "--set diffusion_train.lr: expected a number, got 'abc'"),
    (None, None, ["eval_samples=2.5"], "--set eval_samples: expected an integer, got '2.5'"),
    (None, None, ["diffusion_train.lr=\u0661e-3"],  # int() and float() read Arabic digits
     "--set diffusion_train.lr: expected a number, got '\u0661e-3'"),
    (None, None, ["unet.channels=[1.5]"],
     "--set unet.channels: expected comma-separated integers, got '[1.5]'"),
    (None, None, ["unet.channels="], "--set unet.channels: UNetConfig.channels needs at least "
                                     "one level"),  # the empty list, which a UNet cannot be
    (None, None, ["unet.chanels=3"], f"--set: unknown key unet.chanels (unet has: {UNET})"),
    (None, None, ["unte.channels=3"], f"--set: unknown key unte (the top level has: {TOP})"),
    (None, None, ["diffusion_train.lr=-1"],
     "--set diffusion_train.lr: TrainConfig.lr must be > 0, got -1.0"),
    (None, None, ["schedule.kind=quadratic"],
     "--set schedule.kind: unknown value 'quadratic' (choose from linear, cosine)"),
    (None, None, ["vae.latent_channels=3"],
     "--set vae.latent_channels: unet.in_channels must equal vae.latent_channels"),
    (None, None, ["unet.channels=12,24", "diffusion_train.lr=1e-3"],
     "--set unet.channels: UNetConfig: every channel count must be divisible by groups"),
    (None, None, ["diffusion_train.seed=-1"],
     "--set diffusion_train.seed: TrainConfig.seed must be >= 0, got -1"),
    (None, None, ["unet=3"], f"--set unet: a section, not a value (unet has: {UNET})"),
    (None, None, ["unet.channels.first=3"], "--set unet.channels: a value, not a section"),
    (None, None, ["eval_samples"], "--set 'eval_samples': expected KEY=VALUE, e.g. "
                                   "unet.channels=32,64"),
    ("cfg.toml", "[unet]\nchanels = [3]\n", [],
     f"cfg.toml: unknown key unet.chanels (unet has: {UNET})"),
    ("cfg.toml", "[unte]\nchannels = [3]\n", [],
     f"cfg.toml: unknown key unte (the top level has: {TOP})"),
    ("cfg.toml", '[unet]\ntime_dim = "8"\n', [],
     "cfg.toml: unet.time_dim: expected an integer, got '8'"),
    ("cfg.json", json.dumps({"eval_samples": "9" * 100_000}), [],
     f"cfg.json: eval_samples: expected an integer, got '{'9' * 59}..."),  # cut short
    ("cfg.toml", "[diffusion_train]\nsteps = 2.0\n", [],
     "cfg.toml: diffusion_train.steps: expected an integer, got 2.0"),
    ("cfg.json", '{"unet": {"channels": [1.5]}}', [],
     "cfg.json: unet.channels: expected a list of integers, got [1.5]"),
    ("cfg.toml", "[diffusion_train]\nlr = -1\n", [],
     "cfg.toml: diffusion_train: TrainConfig.lr must be > 0, got -1.0"),
    ("cfg.toml", "[unet]\nchannels = []\n", [],
     "cfg.toml: unet: UNetConfig.channels needs at least one level"),
    ("cfg.toml", "[sampling]\nsamplers = []\n", [],
     "cfg.toml: sampling: SamplingConfig.samplers needs at least one sampler"),
    ("cfg.toml", "[sampling]\nseed = -2\n", [],
     "cfg.toml: sampling: SamplingConfig.seed must be >= 0, got -2"),
    ("cfg.toml", 'schedule = "cosine"\n', [],
     f"cfg.toml: schedule: a section, not a value (schedule has: {has(ScheduleConfig)})"),
    ("cfg.toml", "[unet\n", [], "cfg.toml: not valid TOML (..."),
    ("cfg.json", '{"unet": ', [], "cfg.json: not valid JSON (..."),
    ("cfg.json", '{"eval_samples": 1, "eval_samples": 2}', [],
     "cfg.json: not valid JSON (key 'eval_samples' given twice)"),
    ("cfg.json", "[1, 2]", [], "cfg.json: expected a JSON object of config keys, got list"),
    ("cfg.json", "[" * 100_000, [], "cfg.json: not valid JSON (..."),
    ("cfg.yaml", "unet: {}\n", [], "cfg.yaml: a config file ends in .toml or .json"),
    ("cfg.toml", b"\xff\xfe", [], "cfg.toml: not UTF-8 text"),
    ("cfg.toml", "#" * (recipe.MAX_BYTES + 1), [],
     f"cfg.toml: over {recipe.MAX_BYTES} bytes, too big for a run config"),
    ("cfg.toml", "[diffusion_train]\nlr = 1e-3\n", ["diffusion_train.lr=0"],
     "--set diffusion_train.lr: TrainConfig.lr must be > 0, got 0.0"),
]


@pytest.mark.parametrize("name, text, items, line", ERRORS, ids=[e[3][:50] for e in ERRORS])
def test_each_mistake_is_one_line_and_creates_nothing(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        name: str | None, text: str | bytes | None, items: list[str], line: str) -> None:
    monkeypatch.chdir(tmp_path)  # the messages name the file as given: cfg.toml
    argv: list[str] = []
    if name is not None:
        assert text is not None
        Path(name).write_bytes(text if isinstance(text, bytes) else text.encode())
        argv += ["--config", name]
    for item in items:
        argv += ["--set", item]
    where = ["--run-dir", "run", *CPU]
    for command in (["run", *where], ["train", "diffusion", *where], ["config"]):
        got = assert_fails(capsys, 2, *command, *argv)
        if line.endswith("..."):
            assert got.startswith(f"error: {line[:-3]}") and len(got) < 200, got
        else:
            assert got == f"error: {line}"
        assert not (tmp_path / "run").exists()


def test_missing_directory_and_unreadable_files(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    run = tmp_path / "run"
    missing, folder, locked = tmp_path / "none.toml", tmp_path / "dir.toml", tmp_path / "l.toml"
    folder.mkdir()
    cases = [(missing, f"error: {missing}: no such file"),
             (folder, f"error: {folder}: is a directory, not a config file")]
    if os.geteuid() != 0:  # root reads any file
        locked.write_text("eval_samples = 3\n")
        locked.chmod(0)
        cases.append((locked, f"error: {locked}: cannot read it (Permission denied)"))
    for path, line in cases:
        assert assert_fails(capsys, 2, "run", "--config", path, "--run-dir", run, *CPU) == line
        assert not run.exists()


# ---------------------------------------------------------------- end to end


def test_run_with_a_config_file_and_a_set(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                          tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(printed(capsys, "--preset", "tiny"))
    run = tmp_path / "run"
    assert main(["run", "--config", str(path), "--set", "diffusion_train.lr=4e-3",
                 "--data-dir", str(data_dir), "--run-dir", str(run), *CPU, "--quiet"]) == 0
    assert (run / "config.toml").read_bytes() == path.read_bytes()
    manifest = json.loads((run / "run.json").read_text())
    expected = R(preset("tiny"), diffusion_train=R(preset("tiny").diffusion_train, lr=4e-3))
    assert manifest["config"] == json.loads(json.dumps(to_dict(expected)))
    assert manifest["config"]["diffusion_train"]["lr"] == 4e-3
    assert manifest["preset"] == f"default + {path} + --set diffusion_train.lr=4e-3"
    assert f"default + {path}" in (run / "report.md").read_text()
