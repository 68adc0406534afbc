"""A story's own characters and LoRA files: what `StoryOptions`' photomaker, refs, face and lora settings resolve to.

Photo mode (`photomaker` set, docs/identity.md): each character given reference photos (`--ref NAME=a.jpg,b.jpg`,
or a `<ref: a.jpg, b.jpg>` marker on its line of the story file) takes PhotoMaker identity tokens from them; every
prompt naming the character fuses them into its class word after the switch step. The PhotoMaker's own LoRA is
merged into the model at scale 1 (the official app's `fuse_lora()`), before any `--lora`. Characters without
photos and [NC] panels stay text only.

Here, in the order a run meets them:
- the settings' syntax (`check_options`, from `StoryOptions.__post_init__`: no file is read);
- `plan_references(story, options)`: every check that needs files but no model (names, trigger words, photos,
  the PhotoMaker folder, face inputs); the CLI runs it before loading the model, the pipeline again;
- `encode_identities(...)`: the identity tokens of the characters a story shows, once per run;
- `file_digest`: what saved banks record of the photos, LoRAs and PhotoMaker they were made with.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from .. import checkpoints
from ..errors import CheckpointError, ConfigError
from ..lora import parse_lora_spec
from ..story import Story
from .identity import (
    TRIGGER_WORD,
    IdentityEncoder,
    check_description,
    load_face_embeds,
    load_photos,
    photos_with_faces,
)

FACE_DIM = 512    # ArcFace embedding width (buffalo_l's w600k_r50); a converted v2's config says its own


# ----------------------------------------------------------------------------------------------------
# Syntax of the settings


def parse_ref(spec: str) -> tuple[str, tuple[str, ...]]:
    """`NAME=photo1.jpg[,photo2.jpg...]` (--ref) -> (name, photos)."""
    name, sep, files = spec.partition("=")
    name = name.strip().strip("[]")
    photos = tuple(p.strip() for p in files.split(",") if p.strip())
    if not sep or not name or not photos:
        raise ConfigError(f"--ref {spec!r} is not NAME=photo.jpg[,photo2.jpg...]; e.g. --ref Ana=ana1.jpg,ana2.jpg")
    return name, photos


def parse_face_embeds(spec: str) -> tuple[str | None, str]:
    """`[NAME=]FILE.npy` (--face-embeds) -> (name or None, file)."""
    name, sep, path = spec.partition("=")
    if sep and name.strip() and os.sep not in name:
        return name.strip().strip("[]"), path.strip()
    return None, spec.strip()


def check_options(photomaker: str | None, refs: Sequence[str], face_model: str | None,
                  face_embeds: Sequence[str], loras: Sequence[str]) -> None:
    """The settings' own consistency (no file is read): one-line errors naming the flag and the fix."""
    names = [parse_ref(spec)[0] for spec in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--ref {twice[0]} is given {names.count(twice[0])} times; list all of its photos in one: "
                          f"--ref {twice[0]}=photo1.jpg,photo2.jpg")
    faces = [parse_face_embeds(spec) for spec in face_embeds]
    face_names = [n for n, _ in faces]
    if len(face_names) != len(set(face_names)):
        raise ConfigError("--face-embeds names a character twice (or gives two files without NAME=); give one "
                          "NAME=FILE.npy per character with photos")
    for spec in loras:
        if not np.isfinite(parse_lora_spec(spec)[1]):
            raise ConfigError(f"--lora {spec}: the scale is not a finite number; pass FILE:SCALE with e.g. 0.8")
    if photomaker is None:
        given = [flag for flag, value in (("--ref", refs), ("--face-model", face_model),
                                          ("--face-embeds", face_embeds)) if value]
        if given:
            raise ConfigError(f"{given[0]} needs photo mode: pass --photomaker DIR (a folder from `python -m convert "
                              "photomaker`)")
    if face_model and face_embeds:
        raise ConfigError("give one face input: --face-model DIR (computes the embeddings) or --face-embeds "
                          "FILE.npy (computed elsewhere), not both")


def lora_list(specs: Iterable[str], photomaker_lora: str | None = None) -> list[tuple[str, float]]:
    """The LoRAs a run merges, in order: the PhotoMaker's own (scale 1, photo mode), then each FILE[:SCALE]."""
    return ([(photomaker_lora, 1.0)] if photomaker_lora else []) + [parse_lora_spec(s) for s in specs]


# ----------------------------------------------------------------------------------------------------
# What a story's photos resolve to


@dataclass(frozen=True)
class ReferencePlan:
    """A photo-mode story's inputs, checked: the PhotoMaker folder and each character's photos and face inputs."""
    photomaker: str                              # the converted folder
    version: int                                 # PhotoMaker 1 or 2
    trigger: str                                 # the trigger word ("img")
    lora: str                                    # the PhotoMaker's LoRA file
    photos: dict[str, tuple[str, ...]]           # characters with photos (story order) -> their files
    face_embeds: dict[str, np.ndarray]           # v2 without --face-model: name -> [photos, 512] embeddings


def story_photos(story: Story, refs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each character's photos, from its `<ref: ...>` marker or a --ref (one place per character)."""
    given = dict(parse_ref(spec) for spec in refs)
    defined = ", ".join(f"[{n}]" for n in story.characters) or "none"
    for name in given:
        if name not in story.characters:
            raise ConfigError(f"--ref {name}=...: the story has no character [{name}] (defined: {defined}); use one "
                              "of its names")
        if story.characters[name].photos:
            raise ConfigError(f"character [{name}] has photos both in the story file (<ref: ...>) and from --ref; "
                              "give them in one place")
    photos = {}
    for name, character in story.characters.items():
        if character.photos or name in given:
            photos[name] = tuple(character.photos) or given[name]
    return photos


def plan_references(story: Story, options) -> ReferencePlan | None:
    """The checked photo-mode inputs of `story` under `options` (StoryOptions), None in text mode.

    Errors (one line, before any model is loaded): photos without --photomaker; an unknown character in
    --ref; photos given twice; a folder that is not a converted PhotoMaker; a description without its trigger
    (or with two), or a trigger without photos; a photo that cannot be read or is too small; v2 without face
    input, or face embeddings that do not fit the photos; v1 with face input.
    """
    photos = story_photos(story, options.refs)
    if options.photomaker is None:
        if photos:
            name = next(iter(photos))
            raise ConfigError(f"the story gives reference photos for [{name}] (<ref: ...>) but photo mode is off; "
                              "pass --photomaker DIR (a folder from `python -m convert photomaker`) or remove the "
                              "marker")
        return None
    folder = options.photomaker
    index = photomaker_index(folder)
    version = int(index.get("photomaker_version", 1))
    trigger = index.get("trigger_word", TRIGGER_WORD)
    lora = photomaker_lora(folder)
    for name, character in story.characters.items():
        check_description(name, character.description, has_photos=name in photos, trigger=trigger)
    for paths in photos.values():
        load_photos(paths)          # readable, large enough
    face_embeds: dict[str, np.ndarray] = {}
    if version == 1 and (options.face_model or options.face_embeds):
        raise ConfigError("PhotoMaker v1 takes no face embeddings; drop --face-model / --face-embeds (they are for "
                          "PhotoMaker v2)")
    if version == 2 and photos:
        if not (options.face_model or options.face_embeds):
            raise ConfigError("PhotoMaker v2 needs face embeddings: pass --face-model DIR (insightface buffalo_l "
                              "models) or --face-embeds NAME=FILE.npy")
        if options.face_embeds:
            width = checkpoints.read_json(folder, "id_encoder/config.json").get("id_embedding_dim", FACE_DIM)
            face_embeds = _face_files(options.face_embeds, photos, width)
    return ReferencePlan(folder, version, trigger, lora, photos, face_embeds)


_CONVERT_HINT = "convert one with `python -m convert photomaker --src photomaker-v1.bin --dst DIR`"


def photomaker_index(folder: str) -> dict:
    """The model_index.json of a converted PhotoMaker folder (--photomaker), with errors that say so."""
    try:
        index = checkpoints.read_index(folder)
    except CheckpointError:
        raise ConfigError(f"--photomaker {folder} is not a converted PhotoMaker folder; {_CONVERT_HINT}") from None
    if index.get("arch") != "photomaker":
        raise ConfigError(f"--photomaker {folder} is a converted {index.get('arch')!r} model, not a PhotoMaker; "
                          f"{_CONVERT_HINT}")
    return index


def photomaker_lora(folder: str) -> str:
    """The LoRA file of a converted PhotoMaker folder (merged at scale 1 in photo mode)."""
    lora = os.path.join(folder, photomaker_index(folder).get("lora", "lora_weights.safetensors"))
    if not os.path.isfile(lora):
        raise ConfigError(f"--photomaker {folder}: its LoRA file {os.path.basename(lora)} is missing; {_CONVERT_HINT}")
    return lora


def _face_files(specs: Sequence[str], photos: dict[str, tuple[str, ...]], width: int) -> dict[str, np.ndarray]:
    files = dict(parse_face_embeds(spec) for spec in specs)
    if None in files:
        if len(photos) != 1 or len(files) != 1:
            raise ConfigError("--face-embeds FILE.npy without NAME= works when one character has photos; with "
                              f"several ({', '.join(photos)}) give one NAME=FILE.npy each")
        files = {next(iter(photos)): files[None]}
    for name in files:
        if name not in photos:
            raise ConfigError(f"--face-embeds {name}=...: [{name}] has no reference photos; give embeddings for the "
                              f"characters with photos ({', '.join(photos)})")
    missing = [n for n in photos if n not in files]
    if missing:
        raise ConfigError(f"--face-embeds: no embeddings for [{missing[0]}]; add --face-embeds {missing[0]}=FILE.npy "
                          f"holding [{len(photos[missing[0]])}, {width}] ArcFace embeddings of its photos")
    return {name: load_face_embeds(files[name], len(photos[name]), width) for name in photos}


# ----------------------------------------------------------------------------------------------------
# Identity tokens


@dataclass(frozen=True)
class StoryIdentities:
    """The identities of a photo-mode run: what `StoryPipeline.encode_story` fuses into the prompts."""
    encoder: IdentityEncoder
    tokens: dict[str, jax.Array]                 # name -> [photos x tokens per photo, D]
    photos: dict[str, tuple[str, ...]]           # the photos each identity came from (v2: those with a face)
    start_merge_step: int                        # steps i <= this use the text-only encoding


def encode_identities(encoder: IdentityEncoder, plan: ReferencePlan, names: Iterable[str], start_merge_step: int,
                      *, face_embedder: Callable[[Sequence[str]], np.ndarray] | None = None,
                      warn=print) -> StoryIdentities:
    """The identity tokens of the characters `names` that have photos: the ID encoder runs once per character.

    v2: face embeddings from `face_embedder(paths)` (a `faces.FaceEmbedder(...).embed_photos`) or the plan's
    files; a photo without a face is left out of both inputs, with a warning naming it."""
    tokens, used = {}, {}
    for name in names:
        if name not in plan.photos:
            continue
        paths = list(plan.photos[name])
        faces = None
        if plan.version == 2:
            embeds = face_embedder(paths) if face_embedder is not None else plan.face_embeds[name]
            keep, faces = photos_with_faces(paths, embeds, warn=warn)
            paths = [paths[i] for i in keep]
        tokens[name] = encoder.identity_tokens(load_photos(paths), faces)
        used[name] = tuple(paths)
    return StoryIdentities(encoder, tokens, used, start_merge_step)


# ----------------------------------------------------------------------------------------------------
# What banks record

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """The first 16 hex digits of a file's SHA-256 (remembered per path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]
