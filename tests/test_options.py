"""Options declared once (storydiff_jax.options): the CLI flags, their defaults and help, dicts of settings and the
web form's inputs are all generated from the StoryOptions / TransitionOptions declarations. No model is loaded."""

import argparse
import dataclasses

import pytest

from infer import story as story_cli
from infer import transition as transition_cli
from storydiff_jax.errors import ConfigError
from storydiff_jax.options import Options, option
from storydiff_jax.pipelines import StoryOptions
from storydiff_jax.pipelines.transition import TransitionOptions


def parse(cli, *argv):
    return cli.build_parser().parse_args(["--out=o", *argv] + (["--story=s"] if cli is story_cli else []))


def test_every_setting_is_declared_with_help():
    for cls in (StoryOptions, TransitionOptions):
        declared = {f.name for f in cls.option_fields()}
        assert declared == {f.name for f in dataclasses.fields(cls)}, cls
        assert all(f.spec.help for f in cls.option_fields())


def test_cli_flags_and_help_come_from_the_declarations():
    parser = story_cli.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for f in StoryOptions.option_fields():
        assert flags[f.name].option_strings == [f.flag]
        assert flags[f.name].default is None, f.name            # unset: the option's (or the preset's) default
    assert flags["freeu"].option_strings == ["--no-freeu"]                 # a default-True switch
    assert flags["bank_offload"].option_strings == ["--bank-offload"]
    assert flags["mode"].choices == ["bank", "window"] and flags["style"].choices is None   # style names are loose
    text = parser.format_help()
    assert "denoising steps (default: 35; 8 on tiny presets)" in " ".join(text.split())
    assert "--no-anchor" in transition_cli.build_parser().format_help()
    assert "decode-batch" not in transition_cli.build_parser().format_help()   # declared without a flag


def test_from_args_fills_unset_options_with_the_model_defaults():
    tiny = StoryOptions.defaults(tiny=True)
    assert (tiny["steps"], tiny["height"], tiny["width"]) == (8, 128, 128)
    assert StoryOptions.defaults()["steps"] == 35
    o = StoryOptions.from_args(parse(story_cli, "--steps", "3", "--no-freeu", "--id-length", "2", "--sa32=0.25"),
                               defaults=tiny)
    assert (o.steps, o.height, o.freeu, o.id_length, o.sa32, o.mode) == (3, 128, False, 2, 0.25, "bank")
    # An explicit 0 is not "unset": it reaches the checks and is refused there, as from the Python API.
    with pytest.raises(ConfigError, match="steps must be a whole number >= 1"):
        StoryOptions.from_args(parse(story_cli, "--steps", "0"), defaults=tiny)
    t = TransitionOptions.from_args(parse(transition_cli, "--no-anchor", "--ip-scale", "0.5"),
                                    defaults=TransitionOptions.defaults(tiny=True))
    assert (t.anchor, t.ip_scale, t.frames, t.steps) == (False, 0.5, 8, 4)


def test_from_dict_rejects_unknown_keys_and_types_strings():
    with pytest.raises(ConfigError) as e:
        StoryOptions.from_dict({"steps": 3, "stpes": 4})
    assert "\n" not in str(e.value) and "'stpes'" in str(e.value) and "steps" in str(e.value)
    o = StoryOptions.from_dict({"steps": "3", "guidance": "4", "freeu": "off", "id_length": "none", "seed": 7})
    assert (o.steps, o.guidance, o.freeu, o.id_length, o.seed) == (3, 4.0, False, None, 7)
    assert isinstance(StoryOptions.from_dict({"guidance": 4}).guidance, float)   # typed as declared
    with pytest.raises(ConfigError, match="steps: '2.5' is not a whole number"):
        StoryOptions.from_dict({"steps": "2.5"})
    with pytest.raises(ConfigError, match="mode 'tiles' is not one of bank, window"):   # the options' own check
        StoryOptions.from_dict({"mode": "tiles"})
    with pytest.raises(ConfigError, match="unknown style 'sepia'"):
        StoryOptions.from_dict({"style": "sepia"})
    # A run's manifest settings rebuild the same options.
    o = StoryOptions(steps=4, negative="blurry", chunk=6, mode="window")
    assert StoryOptions.from_dict(o.to_dict()) == o


@pytest.mark.parametrize("cls, cli, values", [
    (StoryOptions, story_cli, {"negative": "-blurry", "steps": 3, "freeu": False, "id_length": None, "sa64": 0.25,
                               "mode": "window", "chunk": 5, "style": "comic book", "bank_offload": True}),
    (StoryOptions, story_cli, {"photomaker": "pm", "refs": ["Ana=a.jpg,b.jpg", "Bo=c.jpg"], "style_strength": 30,
                               "loras": ("x.safetensors:0.5", "-y.safetensors"), "face_embeds": ["Ana=a.npy"]}),
    (TransitionOptions, transition_cli, {"prompt": "a walk", "frames": 6, "anchor": False, "smp": "none",
                                         "guidance": 3.0, "loras": ["sd15.safetensors:0.8"]}),
])
def test_to_argv_round_trips_through_the_cli_parser(cls, cli, values):
    argv = cls.to_argv(values)
    got = cls.from_args(parse(cli, *argv), defaults=cls.defaults())
    assert got == cls.from_dict(values, defaults=cls.defaults())
    with pytest.raises(ConfigError, match="unknown StoryOptions setting 'colour'"):
        StoryOptions.to_argv({"colour": "red"})


def test_repeated_options_are_tuples_from_every_source():
    """A repeated option (`tuple[str, ...]`): a flag given once per value, a list or tuple from Python or JSON, a
    text box's lines from a form; the check of the settings as a whole runs the same from each."""
    flags = {a.dest: a for a in story_cli.build_parser()._actions}
    assert flags["refs"].option_strings == ["--ref"] and flags["loras"].option_strings == ["--lora"]
    o = StoryOptions.from_args(parse(story_cli, "--photomaker", "pm", "--ref", "Ana=a.jpg", "--ref", "Bo=b.jpg"))
    assert o.refs == ("Ana=a.jpg", "Bo=b.jpg") and o.loras == ()
    assert StoryOptions.from_dict({"loras": "a.safetensors\n\n b.safetensors:0.5 \n"}).loras == (
        "a.safetensors", "b.safetensors:0.5")
    assert StoryOptions.from_dict(o.to_dict()) == o
    with pytest.raises(ConfigError, match="--ref needs photo mode: pass --photomaker DIR"):
        StoryOptions(refs=("Ana=a.jpg",))
    with pytest.raises(ConfigError, match="--ref 'Ana' is not NAME=photo.jpg"):
        StoryOptions(photomaker="pm", refs=("Ana",))
    with pytest.raises(ConfigError, match="--ref Ana is given 2 times"):
        StoryOptions(photomaker="pm", refs=("Ana=a.jpg", "Ana=b.jpg"))
    with pytest.raises(ConfigError, match="style strength 120 is outside 0..100"):
        StoryOptions(style_strength=120)
    with pytest.raises(ConfigError, match="scale is not a finite number"):
        TransitionOptions(loras=("a.safetensors:nan",))


def test_form_groups_and_the_generated_gradio_inputs():
    gr = pytest.importorskip("gradio")
    from infer.app import AUTO, form_values, option_inputs

    shown = {f.name for f in StoryOptions.option_fields() if f.spec.form}
    control = {"control_scale", "control_start", "control_end", "guess_mode", "control_mode", "control_preprocessor",
               "canny_low", "canny_high"}
    assert shown == {"style", "negative", "steps", "guidance", "height", "width", "seed", "id_length", "sa32", "sa64",
                     "mode", "window", "layout", "sampler", "freeu", "style_strength"} | control
    defaults = StoryOptions.defaults(tiny=True)
    with gr.Blocks():
        inputs = {}
        for group in ("look", "prompt", "size", "sampling", "csa", "more", "photos", "control"):
            inputs |= option_inputs(StoryOptions, group, defaults)
        video = option_inputs(TransitionOptions, "main", TransitionOptions.defaults(tiny=True), prefix="video-")
    assert set(inputs) == shown
    assert isinstance(inputs["mode"], gr.Radio) and isinstance(inputs["style"], gr.Dropdown)
    assert isinstance(inputs["sa32"], gr.Slider) and isinstance(inputs["freeu"], gr.Checkbox)
    assert inputs["steps"].value == 8 and inputs["height"].value == 128 and inputs["height"].elem_id == "height"
    assert inputs["id_length"].value == AUTO and inputs["id_length"].elem_id == "id-length"
    assert inputs["freeu"].value is True and inputs["sa32"].value == 0.5
    assert isinstance(inputs["control_scale"], gr.Slider) and inputs["control_mode"].value == AUTO
    assert "canny" in [c for c, _ in inputs["control_mode"].choices] and inputs["guess_mode"].value is False
    assert set(video) == {"frames", "steps", "seed"} and video["steps"].elem_id == "video-steps"
    assert form_values({"id_length": AUTO, "steps": 3}) == {"id_length": None, "steps": 3}


def test_a_new_options_class_gets_all_of_it():
    """The mechanism is generic: e.g. the training config or an evaluation's options declare fields the same way."""

    @dataclasses.dataclass(frozen=True)
    class Demo(Options):
        data_dir: str = option(help="dataset folder")
        rate: float = option(0.1, "learning rate", tiny=0.5)
        verbose: bool = option(False, "say more")

    p = argparse.ArgumentParser()
    Demo.add_arguments(p)
    args = p.parse_args(["--data-dir", "d", "--verbose"])
    assert Demo.from_args(args, defaults=Demo.defaults()) == Demo("d", 0.1, True)
    assert Demo.defaults(tiny=True) == {"rate": 0.5, "verbose": False}
    assert "learning rate (default: 0.1; 0.5 on tiny presets)" in " ".join(p.format_help().split())
    with pytest.raises(SystemExit):
        p.parse_args([])                                  # a setting without a default is a required flag


def test_positional_arguments_subsets_and_help_overrides():
    """Positional options (one value, or one or more for a repeated one), a command that takes a subset of a
    class's options with its own help texts, and to_argv writing positionals after "--"."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Demo(Options):
        runs: tuple[str, ...] = option(help="run folders", positional=True, metavar="RUN")
        scale: float = option(1.0, "a scale")
        out: str | None = option(None, "where to write")

    p = argparse.ArgumentParser()
    Demo.add_arguments(p)
    args = p.parse_args(["a", "b", "--scale", "2"])
    assert Demo.from_args(args) == Demo(runs=("a", "b"), scale=2.0)
    with pytest.raises(SystemExit):
        p.parse_args(["--scale", "2"])                    # a positional with one or more values is required
    argv = Demo.to_argv({"runs": ["-odd", "b"], "out": "x"})
    assert argv == ["--out=x", "--", "-odd", "b"]
    assert Demo.from_args(p.parse_args(argv)) == Demo(runs=("-odd", "b"), out="x")

    sub = argparse.ArgumentParser()
    Demo.add_arguments(sub, only=("scale",), help={"scale": "the other command's words"})
    text = " ".join(sub.format_help().split())
    assert "--scale SCALE the other command's words" in text and "RUN" not in text and "--out" not in text
    with pytest.raises(TypeError, match="no options"):
        Demo.add_arguments(argparse.ArgumentParser(), only=("nope",))


def test_training_and_evaluation_flags_come_from_their_declarations():
    """`python -m train smp` / `cache-features` and `python -m infer.evaluate` build their flags from TrainConfig
    and the evaluation option classes: every declared option has its flag, parsed values land typed."""
    from infer.evaluate import COMMANDS, CompareOptions
    from infer.evaluate import build_parser as eval_parser
    from train.__main__ import build_parser, run_config
    from train.config import TrainConfig

    parser = build_parser()
    args = parser.parse_args(["smp", "--data-dir", "d", "--workdir", "w", "--preset", "tiny-video", "--steps", "7",
                              "--lr", "3e-4", "--freeze-motion", "--remat", "full", "--mesh", "data=2,fsdp=4"])
    assert run_config(args) == TrainConfig(model="tiny-video", data_dir="d", steps=7, lr=3e-4, freeze_motion=True,
                                           remat="full", mesh="data=2,fsdp=4")
    smp = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["smp"]
    flags = {s for a in smp._actions for s in a.option_strings}
    assert {f.flag for f in TrainConfig.option_fields() if f.flag} <= flags
    args = parser.parse_args(["cache-features", "--data-dir", "d", "--out", "c", "--model", "m", "--frames", "4"])
    assert run_config(args) == TrainConfig(model="m", data_dir="d", frames=4)
    with pytest.raises(ConfigError, match="--frames 1: a transition needs at least 2 frames"):
        run_config(parser.parse_args(["smp", "--data-dir", "d", "--workdir", "w", "--frames", "1"]))
    args = eval_parser().parse_args(["compare", "a", "b", "--out", "t.md"])
    assert COMMANDS["compare"][0].from_args(args) == CompareOptions(runs=("a", "b"), out="t.md")
