"""`python -m infer.app`: the web app (Gradio) over `infer.story` and `infer.transition`.

    python -m infer.app                                  # tiny random-weight presets, http://127.0.0.1:7860
    python -m infer.app --model ./sdxl-jax --video-model ./video-jax --out out/app

The models are loaded once at start. Every request goes through the CLIs' own `run()` (same options, same
defaults, same checks, same one-line errors, same run folders), one at a time per device: Gradio's queue
holds the others and shows them their place in line. Everything the app writes, Gradio's upload cache
included, lands under --out; it never opens a path typed into the page. The settings inputs are generated
from the StoryOptions / TransitionOptions declarations (`option_inputs`) and reach a handler as one dict.

Your own characters: with `--photomaker DIR` the story tab has REF_SLOTS upload slots, each a character's name
and its photos (they become the CLI's `--ref NAME=...`, copied under --out first), and the style strength; a
story run with photos is in photo mode, one without stays in text mode.
LoRAs: `--lora FILE[:SCALE]` at start applies to every story; LoRA files uploaded in the form add to them for
that run (merged once and kept while the next run asks for the same files).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import os
import shutil
import sys
import threading

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")
POSE_TYPES = (".json",)         # OpenPose keypoints, drawn as skeletons
MAX_IMAGE_SIDE = 4096          # an upload larger than this is refused before it is decoded (decompression bombs)
DEVICE_QUEUE = "device"        # one concurrency group for every generating event: one run at a time per device
AUTO = "auto"                  # id length left to the CLI (4, or the most the story allows)
REF_SLOTS = 4                  # upload slots for characters' reference photos (photo mode)


def build_parser() -> argparse.ArgumentParser:
    from storydiff_jax import compile_cache
    from storydiff_jax.cli import add_dtype_argument
    from storydiff_jax.pipelines.components import PRESETS
    from storydiff_jax.pipelines.video_components import PRESETS as VIDEO_PRESETS

    p = argparse.ArgumentParser(
        prog="python -m infer.app",
        description="The StoryDiffusion web app: a story editor that renders consistent comic panels and pages, "
                    "and transition videos between two panels or two uploaded pictures.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="story model: a folder from `python -m convert pipeline`")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-weight story model (default: tiny-sdxl "
                     "when no --model is given)")
    vsrc = p.add_mutually_exclusive_group()
    vsrc.add_argument("--video-model", metavar="DIR", help="transition model: a folder from `python -m convert "
                      "video`")
    vsrc.add_argument("--video-preset", choices=sorted(VIDEO_PRESETS), help="random-weight transition model "
                      "(default: tiny-video when no --video-model is given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 makes the app reachable from the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--out", default="out/app", metavar="DIR", help="every run's files go under DIR (default: "
                   "out/app): stories/, videos/, banks/, and Gradio's upload cache")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default: "
                   "anyone with the link can use your machine)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload (default: 50)")
    ids = p.add_argument_group("your own characters and LoRAs (see `python -m infer.story --help`)")
    ids.add_argument("--photomaker", metavar="DIR", help="photo mode: a folder from `python -m convert photomaker`; "
                     f"the story tab gets {REF_SLOTS} upload slots for characters' reference photos")
    ids.add_argument("--face-model", metavar="DIR", help="PhotoMaker v2: insightface's buffalo_l ONNX models "
                     "(det_10g.onnx, w600k_r50.onnx), run on the uploaded photos")
    ids.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="LoRA merged into the "
                     "story model for every story (repeatable; scale default 1); the form can add uploaded ones")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR[:SCALE]",
                   help="a ControlNet for the story model (as `python -m infer.story --controlnet`), loaded at start; "
                        "repeatable. The page then takes control images per panel")
    add_dtype_argument(p)
    compile_cache.add_argument(p)
    return p


# ----------------------------------------------------------------------------------------------- helpers
def _cli_parser(module):
    """The CLI's own parser, with its errors raised as one-line ConfigErrors instead of exiting the server."""
    from storydiff_jax.errors import ConfigError

    parser = module.build_parser()

    def error(message):
        raise ConfigError(message)

    parser.error = error
    return parser


def _flags(**values) -> list[str]:
    """--name=value flags for the CLI parser's own (non-option) arguments; None leaves the CLI's default."""
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv.append(f"{flag}={value}")   # one token: a value starting with "-" stays a value
    return argv


def check_upload(path: str | None, what: str, types: tuple[str, ...], max_bytes: int) -> str:
    """An uploaded file Gradio stored for us: right type, within the size limit. Returns its path."""
    from storydiff_jax.errors import ConfigError

    if not path:
        raise ConfigError(f"no {what} uploaded; upload one ({', '.join(types)})")
    ext = os.path.splitext(path)[1].lower()
    if ext not in types:
        raise ConfigError(f"{what}: {ext or 'no extension'} files are not accepted; upload {', '.join(types)}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ConfigError(f"{what}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit; "
                          "upload a smaller file")
    if types == IMAGE_TYPES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:       # reads the header only: the size is known before any decoding
                w, h = im.size
        except (UnidentifiedImageError, OSError):
            raise ConfigError(f"{what} is not a readable image; upload a PNG, JPEG or WebP picture") from None
        if max(w, h) > MAX_IMAGE_SIDE:
            raise ConfigError(f"{what} is {w}x{h} pixels; upload one at most {MAX_IMAGE_SIDE} pixels on a side")
    return path


def progress_listener(progress):
    """A run's progress listener that moves a Gradio progress bar (the run ticks from the request's thread)."""
    def listener(phase: str, done: int, total: int) -> None:
        progress((done, total), desc=phase, unit="steps")

    return listener


def option_inputs(options_cls, group: str, defaults: dict, prefix: str = "") -> dict:
    """The web form's inputs for one group of options, generated from their declarations (`form=` in
    `storydiff_jax.options.option`): name -> Gradio component, created in the caller's layout context."""
    import gradio as gr

    inputs = {}
    for f in options_cls.form_fields(group):
        label = f.spec.label or f.name.replace("_", " ")
        common = {"label": label, "elem_id": prefix + f.name.replace("_", "-")}
        value = defaults.get(f.name)
        choices = f.spec.choice_values()
        if f.spec.widget == "auto":
            # A dropdown, not a number field: an empty gr.Number shows (and sends) 0 from the page.
            inputs[f.name] = gr.Dropdown([AUTO] + [str(c) for c in choices],
                                         value=AUTO if value is None else str(value), **common)
        elif f.type is bool:
            inputs[f.name] = gr.Checkbox(value, **common)
        elif choices is not None:
            inputs[f.name] = (gr.Radio if f.spec.widget == "radio" else gr.Dropdown)(choices, value=value, **common)
        elif f.spec.widget == "slider":
            inputs[f.name] = gr.Slider(*f.spec.bounds, value, step=f.spec.step, **common)
        elif f.type in (int, float):
            step = {"step": f.spec.step} if f.spec.step else {}
            inputs[f.name] = gr.Number(value, precision=0 if f.type is int else None, **step, **common)
        else:
            inputs[f.name] = gr.Textbox(value=value, **common)
    return inputs


def form_values(values: dict) -> dict:
    """Form values as settings: an "auto" choice leaves the option to its default."""
    return {name: None if value == AUTO else value for name, value in values.items()}


def reference_slots() -> dict:
    """REF_SLOTS rows of (character name, its photos): inputs `ref_name_K` / `ref_photos_K` (also API names)."""
    import gradio as gr

    inputs = {}
    for k in range(1, REF_SLOTS + 1):
        with gr.Row():
            inputs[f"ref_name_{k}"] = gr.Textbox(label=f"character {k}", placeholder="Ana", scale=1,
                                                 elem_id=f"ref-name-{k}")
            inputs[f"ref_photos_{k}"] = gr.File(label="its photos", file_count="multiple", file_types=["image"],
                                                type="filepath", scale=2, elem_id=f"ref-photos-{k}")
    return inputs


def slot_photos(values: dict) -> dict[str, list[str]]:
    """{character: photo files} from the slots' values (`ref_name_K`, `ref_photos_K`); empty slots are skipped."""
    from storydiff_jax.errors import ConfigError

    photos: dict[str, list[str]] = {}
    for k in range(1, REF_SLOTS + 1):
        name, files = (values.get(f"ref_name_{k}") or "").strip().strip("[]"), values.get(f"ref_photos_{k}") or []
        if isinstance(files, str):
            files = [files]
        if not name and not files:
            continue
        if not name or not files:
            raise ConfigError(f"reference photo slot {k}: give both the character's name and its photos")
        if name in photos:
            raise ConfigError(f"reference photos: [{name}] has two slots; put all of its photos in one")
        photos[name] = list(files)
    return photos


def _zip_folder(folder: str) -> str:
    """folder -> folder.zip holding folder/..., written under a temporary name first."""
    parent, name = os.path.split(folder)
    tmp_base = os.path.join(parent, f".{name}.zip-partial")
    try:
        tmp = shutil.make_archive(tmp_base, "zip", root_dir=parent, base_dir=name)
        os.replace(tmp, folder + ".zip")
    finally:
        if os.path.exists(tmp_base + ".zip"):
            os.remove(tmp_base + ".zip")
    return folder + ".zip"


# ----------------------------------------------------------------------------------------------- the app
class StoryApp:
    """The loaded models and the request handlers (plain functions of the form's values: testable without a UI)."""

    def __init__(self, args: argparse.Namespace, log=print):
        import infer.story
        import infer.transition
        from storydiff_jax import checkpoints
        from storydiff_jax.cli import compute_dtype
        from storydiff_jax.pipelines import StoryPipeline
        from storydiff_jax.pipelines.components import PRESETS
        from storydiff_jax.pipelines.control import controlnet_config
        from storydiff_jax.pipelines.transition import TransitionPipeline
        from storydiff_jax.pipelines.video_components import load_video_config

        self.args = args
        self.out = os.path.abspath(args.out)
        self.max_upload = int(args.max_upload_mb * 2**20)
        self.story_source = args.model or args.preset or "tiny-sdxl"
        self.video_source = args.video_model or args.video_preset or "tiny-video"
        self.story_cli = _cli_parser(infer.story)
        self.video_cli = _cli_parser(infer.transition)
        dtype = compute_dtype(args.dtype)
        # A wrong model folder fails here, in a second, with the loaders' own messages (not after Gradio's import).
        if self.story_source not in PRESETS:
            checkpoints.read_index(self.story_source)
        load_video_config(self.video_source)
        self.controlnets = [infer.story.parse_controlnet_arg(text)[0] for text in args.controlnet]
        for net in self.controlnets:
            controlnet_config(net)
        log(f"loading {', '.join([self.story_source, *self.controlnets, self.video_source])} ...")
        # Loaded in a thread while the caller imports Gradio and builds the page (both take seconds); `ready()`
        # joins it (and re-raises a loading error) before the app takes requests.
        self._loading = concurrent.futures.ThreadPoolExecutor(1).submit(lambda: (
            StoryPipeline.from_pretrained(self.story_source, controlnets=self.controlnets, dtype=dtype),
            TransitionPipeline.from_pretrained(self.video_source, dtype=dtype)))
        # The photo-mode and LoRA inputs fail here too, before serving (the CLI's own checks).
        from storydiff_jax.lora import check_lora_files
        from storydiff_jax.pipelines.references import photomaker_index

        if args.photomaker:
            photomaker_index(args.photomaker)
        check_lora_files(args.lora)
        self.tiny = self.story_source.startswith("tiny-")
        self.video_tiny = self.video_source.startswith("tiny-")
        self._names = itertools.count()
        self._lock = threading.Lock()

    def ready(self) -> StoryApp:
        self.story_pipe, self.video_pipe = self._loading.result()
        return self

    # The defaults `python -m infer.story` / `infer.transition` use with this model, shown in the form.
    def story_defaults(self) -> dict:
        from storydiff_jax.pipelines import StoryOptions

        return StoryOptions.defaults(tiny=self.tiny)

    def video_defaults(self) -> dict:
        from storydiff_jax.pipelines.transition import TransitionOptions

        return TransitionOptions.defaults(tiny=self.video_tiny)

    def _new_name(self, kind: str) -> str:
        with self._lock:  # unique even for two requests in the same second
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            return f"{kind}-{stamp}-{next(self._names):03d}"

    def _source_flags(self, video: bool) -> dict:
        if video:
            return {"model": self.args.video_model} if self.args.video_model else {"preset": self.video_source}
        return {"model": self.args.model} if self.args.model else {"preset": self.story_source}

    def control_flags(self, files: list[str] | None) -> list[str]:
        """Uploaded control images, named by panel (00.png, 3.json, 3@1.png), as the CLI's --control flags,
        plus the app's --controlnet flags."""
        from storydiff_jax.errors import ConfigError
        from storydiff_jax.pipelines.panel_control import control_file_key, control_files

        files = [f for f in (files or []) if f]
        for path in files:
            name = os.path.basename(path)
            if control_file_key(name) is None:
                raise ConfigError(f"control image {name}: name each file after the panel it poses: 00.png, 3.json "
                                  "(OpenPose keypoints), 3@1.png (ControlNet 1)")
            kind = POSE_TYPES if name.lower().endswith(POSE_TYPES) else IMAGE_TYPES
            check_upload(path, f"control image {name}", kind, self.max_upload)
        keys = control_files(files, "control images") if files else {}
        return ([f"--controlnet={text}" for text in self.args.controlnet]
                + [f"--control={panel}@{net}={path}" for (panel, net), path in sorted(keys.items())])

    # ------------------------------------------------------------------ story
    def run_story(self, text: str, settings: dict, *, save_bank=False, bank_upload: str | None = None,
                  last_bank: str | None = None, photos: dict[str, list[str]] | None = None,
                  loras: list[str] | None = None, lora_scale: float = 1.0, control_files: list[str] | None = None,
                  log=print, listener=None) -> dict:
        """Generate one story with the CLI's run(); returns its folder, files and bank. Raises StoryDiffError.

        settings: StoryOptions values by name (unknown names are refused; None leaves the CLI's default).
        photos: {character: uploaded photo files} (photo mode); loras: uploaded LoRA files, at lora_scale, merged
        after the app's own --lora ones. control_files: uploaded control images / keypoint JSON named by panel
        (00.png, 3.json, 3@1.png)."""
        import infer.story
        from storydiff_jax.errors import ConfigError
        from storydiff_jax.pipelines import StoryOptions

        if not (text or "").strip():
            raise ConfigError("the story is empty; write characters, a blank line, then one panel per line")
        if bank_upload and last_bank:
            raise ConfigError("choose one bank: either upload a bank file or continue with the last saved bank")
        load_bank = check_upload(bank_upload, "bank file", (".npz",), self.max_upload) if bank_upload else last_bank
        name = self._new_name("story")
        settings = {**settings, **self._identity_settings(text, name, photos or {}, loras or [], lora_scale)}
        folder = os.path.join(self.out, "stories", name)
        bank_path = os.path.join(self.out, "banks", name + ".npz") if save_bank else None
        argv = (["--story=(web form)", f"--out={folder}", "--quiet"] + StoryOptions.to_argv(settings)
                + _flags(**self._source_flags(video=False), save_bank=bank_path, load_bank=load_bank)
                + self.control_flags(control_files))
        args = self.story_cli.parse_args(argv)
        infer.story.run(args, log, text=text, pipe=self.story_pipe, listener=listener)
        with open(os.path.join(folder, "story.json")) as f:
            manifest = json.load(f)
        return {
            "folder": folder,
            "zip": _zip_folder(folder),
            "panels": [(os.path.join(folder, p["file"]), p["caption"] or p["prompt"]) for p in manifest["panels"]],
            "pages": [os.path.join(folder, p) for p in manifest["pages"]],
            "bank": bank_path,
            "manifest": manifest,
        }

    def _identity_settings(self, text: str, name: str, photos: dict[str, list[str]], loras: list[str],
                           lora_scale: float) -> dict:
        """The photo-mode and LoRA settings of one request: uploads checked; photos copied under --out."""
        from storydiff_jax.errors import ConfigError
        from storydiff_jax.story import parse_script

        if any(c.photos for c in parse_script(text).characters.values()):
            raise ConfigError("the web app reads no photo paths from the story (<ref: ...>); upload each character's "
                              "photos in its slot under 'reference photos'")
        if photos and not self.args.photomaker:
            raise ConfigError("reference photos need photo mode: start the app with --photomaker DIR")
        refs = []
        for character, files in photos.items():
            folder = os.path.join(self.out, "photos", name)
            os.makedirs(folder, exist_ok=True)
            kept = []
            for k, path in enumerate(files):
                check_upload(path, f"photo {k + 1} of [{character}]", IMAGE_TYPES, self.max_upload)
                # Our own file names: no commas or other characters the --ref syntax would trip on.
                kept.append(shutil.copyfile(path, os.path.join(
                    folder, f"{len(refs)}-{k}{os.path.splitext(path)[1].lower()}")))
            refs.append(f"{character}={','.join(kept)}")
        uploaded = [f"{check_upload(path, 'LoRA file', ('.safetensors',), self.max_upload)}:{lora_scale}"
                    for path in loras]
        out = {"loras": tuple(self.args.lora) + tuple(uploaded), "refs": tuple(refs)}
        if refs:   # photo mode when photos are given: a story without photos stays plain text mode
            out |= {"photomaker": self.args.photomaker, "face_model": self.args.face_model}
        return out

    # ------------------------------------------------------------------ transition
    def run_transition(self, *, start: str, end: str, settings: dict, log=print, listener=None) -> str:
        """Render start -> end (image files the app chose or Gradio stored) to videos/NAME.mp4; returns it.

        settings: TransitionOptions values by name (None leaves the CLI's default)."""
        import infer.transition
        from storydiff_jax.pipelines.transition import TransitionOptions

        name = self._new_name("transition")
        path = os.path.join(self.out, "videos", name + ".mp4")
        argv = ([f"--start={start}", f"--end={end}", f"--out={path}", "--quiet"]
                + TransitionOptions.to_argv(settings) + _flags(**self._source_flags(video=True)))
        infer.transition.run(self.video_cli.parse_args(argv), log, pipe=self.video_pipe, listener=listener)
        return path

    def story_panel_files(self, folder: str) -> tuple[list[str], list[str]]:
        import infer.transition

        return infer.transition.read_story_dir(folder)


# ----------------------------------------------------------------------------------------------- the page
EXAMPLE_STORY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                             "lighthouse_keepers.txt")


def _example_text() -> str:
    try:
        with open(EXAMPLE_STORY, encoding="utf-8") as f:
            return f.read()
    except OSError:  # an installed copy without the examples folder: a small story of our own
        return "[Ana] a girl with a red scarf\n\n[Ana] reads a book #Monday.\n[Ana] walks by the sea #Tuesday.\n"


def _panel_choices(manifest: dict) -> list[tuple[str, int]]:
    return [(f"{i:02d}: {(p['caption'] or p['prompt'])[:60]}", i) for i, p in enumerate(manifest["panels"])]


def build_ui(app: StoryApp):
    import gradio as gr

    from storydiff_jax.errors import StoryDiffError
    from storydiff_jax.pipelines import StoryOptions
    from storydiff_jax.pipelines.transition import TransitionOptions

    sd, vd = app.story_defaults(), app.video_defaults()

    def fail(e: Exception):
        print(f"error: {e}", file=sys.stderr, flush=True)
        return gr.Error(str(e), print_exception=False)

    # The settings arrive as keyword arguments named like their options (`inputs_kwargs` below), which are
    # also the names of the /story and /transition API parameters.
    def story_event(text, save_bank, bank_upload, continue_bank, state, control_files, progress=gr.Progress(),
                    **settings):
        state = dict(state or {})
        lines: list[str] = []
        last_bank = state.get("bank") if continue_bank else None
        if continue_bank and not last_bank:
            raise fail(StoryDiffError("no bank saved in this session yet; run a story with 'save the character "
                                      "bank' first, or upload a bank file"))
        loras, lora_scale = settings.pop("lora_files", None) or [], settings.pop("lora_scale", 1.0)
        try:
            photos = slot_photos({k: settings.pop(k) for k in list(settings) if k.startswith("ref_")})
            r = app.run_story(text, form_values(settings), save_bank=save_bank, bank_upload=bank_upload,
                              last_bank=last_bank, photos=photos, loras=loras, lora_scale=lora_scale,
                              control_files=control_files, log=lines.append, listener=progress_listener(progress))
        except StoryDiffError as e:
            raise fail(e) from None
        state["run"] = r["folder"]
        if r["bank"]:
            state["bank"] = r["bank"]
        choices = _panel_choices(r["manifest"])
        lines.append(f"run folder: {os.path.relpath(r['folder'], app.out)} (under --out)")
        return (r["panels"], r["pages"], r["zip"], r["bank"], "\n".join(lines), state,
                gr.Dropdown(choices=choices, value=0), gr.Dropdown(choices=choices, value=min(1, len(choices) - 1)))

    def transition_event(source, start_panel, end_panel, start_upload, end_upload, state, progress=gr.Progress(),
                         **settings):
        lines: list[str] = []
        settings = form_values(settings)
        try:
            if source == SOURCES[0]:
                folder = (state or {}).get("run")
                if not folder:
                    raise StoryDiffError("no story generated in this session yet; generate one in the Story tab "
                                         "or upload a start and an end image")
                files, prompts = app.story_panel_files(folder)
                if start_panel is None or end_panel is None:
                    raise StoryDiffError("pick a start panel and an end panel")
                start, end = files[int(start_panel)], files[int(end_panel)]
                if not (settings.get("prompt") or "").strip():
                    settings["prompt"] = prompts[int(end_panel)]        # as --story-dir: the end panel's prompt
            else:
                start = check_upload(start_upload, "start image", IMAGE_TYPES, app.max_upload)
                end = check_upload(end_upload, "end image", IMAGE_TYPES, app.max_upload)
            settings["prompt"] = settings.get("prompt") or None         # empty: the CLI's default
            path = app.run_transition(start=start, end=end, settings=settings, log=lines.append,
                                      listener=progress_listener(progress))
        except StoryDiffError as e:
            raise fail(e) from None
        return path, [path, os.path.splitext(path)[0] + ".json"], "\n".join(lines)

    SOURCES = ("panels of the last story", "uploaded images")
    with gr.Blocks(title="StoryDiffusion (JAX)", analytics_enabled=False) as demo:
        gr.Markdown(f"## StoryDiffusion in JAX\nstory model `{app.story_source}` · video model "
                    f"`{app.video_source}`" + (" · *random-weight presets: the pictures are noise, every stage "
                                                "runs*" if app.tiny or app.video_tiny else ""))
        state = gr.State({})
        with gr.Tab("Story"):
            with gr.Row():
                with gr.Column(scale=3):
                    text = gr.Textbox(value=_example_text(), lines=14, max_lines=40, label="story",
                                      elem_id="story-text",
                                      info="[Name] description per character, a blank line, then one panel per line: "
                                           "[Name] ... #caption; [NC] = no character; // comment")
                    with gr.Row():
                        story_settings = option_inputs(StoryOptions, "look", sd)
                    story_settings |= option_inputs(StoryOptions, "prompt", sd)
                with gr.Column(scale=2):
                    for group in ("size", "sampling", "csa"):
                        with gr.Row():
                            story_settings |= option_inputs(StoryOptions, group, sd)
                    with gr.Accordion("more settings", open=False):
                        story_settings |= option_inputs(StoryOptions, "more", sd)
                        # ControlNet: one upload for every panel's map (files named by panel, as --control-dir),
                        # then the generated settings; without a --controlnet the upload is refused with the fix.
                        gr.Markdown("**ControlNet: pose and structure per panel**" + (
                            f" ({', '.join(app.controlnets)})" if app.controlnets else
                            " (start the app with `--controlnet DIR` to use it)"))
                        control_files = gr.File(label="control images, named by panel: 00.png, 3.json (OpenPose "
                                                "keypoints), 3@1.png (for ControlNet 1)", file_count="multiple",
                                                file_types=list(IMAGE_TYPES + POSE_TYPES), type="filepath",
                                                elem_id="control-files")
                        story_settings |= option_inputs(StoryOptions, "control", sd)
                    if app.args.photomaker:
                        with gr.Accordion("reference photos (PhotoMaker)", open=True):
                            gr.Markdown("Give a character photos: its name, and in the story its class word then "
                                        "`img`, e.g. `[Ana] a woman img, red coat`. Characters without photos "
                                        "stay text only.")
                            story_settings |= option_inputs(StoryOptions, "photos", sd)
                            story_settings |= reference_slots()
                    with gr.Accordion("LoRA files", open=False):
                        story_settings["lora_files"] = gr.File(
                            label="LoRA files (.safetensors), added to the app's --lora" if app.args.lora else
                            "LoRA files (.safetensors)", file_count="multiple", file_types=[".safetensors"],
                            type="filepath", elem_id="lora-files")
                        story_settings["lora_scale"] = gr.Number(1.0, label="scale of the uploaded LoRAs",
                                                                 elem_id="lora-scale")
                    with gr.Accordion("character bank", open=False):
                        save_bank = gr.Checkbox(False, label="save the character bank of this run",
                                                elem_id="save-bank")
                        continue_bank = gr.Checkbox(False, label="continue with this session's last saved bank",
                                                    elem_id="continue-bank")
                        bank_upload = gr.File(label="or load a bank file (.npz)", file_types=[".npz"], type="filepath")
                    go = gr.Button("Generate story", variant="primary", elem_id="generate")
            panels = gr.Gallery(label="panels", columns=4, elem_id="panels", height="auto")
            pages = gr.Gallery(label="pages", columns=3, elem_id="pages", height=480, object_fit="contain")
            with gr.Row():
                run_zip = gr.File(label="run folder (.zip: panels, pages, story.json)", elem_id="run-zip")
                bank_file = gr.File(label="character bank", elem_id="bank-file")
            story_log = gr.Textbox(label="log", lines=3, elem_id="story-log")
        with gr.Tab("Transition"):
            with gr.Row():
                with gr.Column():
                    source = gr.Radio(list(SOURCES), value=SOURCES[0], label="frames from", elem_id="video-source")
                    with gr.Row():
                        start_panel = gr.Dropdown([], label="start panel", elem_id="start-panel")
                        end_panel = gr.Dropdown([], label="end panel", elem_id="end-panel")
                    with gr.Row():
                        start_upload = gr.Image(type="filepath", sources=["upload"], label="start image")
                        end_upload = gr.Image(type="filepath", sources=["upload"], label="end image")
                    video_settings = option_inputs(TransitionOptions, "prompt", vd, prefix="video-")
                    with gr.Row():
                        video_settings |= option_inputs(TransitionOptions, "main", vd, prefix="video-")
                    go_video = gr.Button("Generate transition", variant="primary", elem_id="generate-video")
                with gr.Column():
                    video = gr.Video(label="video", elem_id="video")
                    video_files = gr.File(label="video + manifest", file_count="multiple")
                    video_log = gr.Textbox(label="log", lines=3)
        go.click(story_event, [text, save_bank, bank_upload, continue_bank, state, control_files],
                 inputs_kwargs=story_settings,
                 outputs=[panels, pages, run_zip, bank_file, story_log, state, start_panel, end_panel],
                 api_name="story", concurrency_id=DEVICE_QUEUE, concurrency_limit=1)
        go_video.click(transition_event, [source, start_panel, end_panel, start_upload, end_upload, state],
                       inputs_kwargs=video_settings, outputs=[video, video_files, video_log],
                       api_name="transition", concurrency_id=DEVICE_QUEUE, concurrency_limit=1)
    demo.queue(default_concurrency_limit=1)
    return demo


def serve(args: argparse.Namespace) -> None:
    from storydiff_jax import compile_cache
    from storydiff_jax.errors import ConfigError

    out = os.path.abspath(args.out)
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port number; use one in 1..65535, e.g. --port 7860")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    # Gradio's upload/output cache goes under --out too (read when gradio is imported).
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(out, ".gradio")
    compile_cache.enable(args.compile_cache)
    app = StoryApp(args)          # checks the model folders first: a wrong one leaves no --out behind
    os.makedirs(out, exist_ok=True)
    demo = build_ui(app)
    app.ready()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the app is reachable from other machines", file=sys.stderr)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=bool(args.share), ssr_mode=False,
                    max_file_size=int(args.max_upload_mb * 2**20), show_error=True, quiet=False)
    except OSError as e:  # Gradio's "Cannot find empty port", or an address this machine does not have
        raise ConfigError(f"cannot serve on {args.host}:{args.port} ({str(e).splitlines()[0]}); pass another "
                          "--port (or --host)") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from storydiff_jax.cli import run_command

    return run_command(lambda: serve(args), interrupted="app stopped")


if __name__ == "__main__":
    sys.exit(main())
