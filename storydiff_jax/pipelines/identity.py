"""Reference photos -> prompt embeddings: PhotoMaker's trigger word, generalised to several characters.

PhotoMaker (and StoryDiffusion's "Using Ref Images" mode, which runs PhotoMaker v1 through a copy of its
pipeline) conditions on a prompt whose character text reads `<class word> <trigger>`, e.g. "a woman img,
wearing a red coat". Its `encode_prompt_with_trigger_word`, restated:

1. tokenize without truncation; drop the trigger token; the token just before it is the *class token*;
2. repeat the class token once per identity token (1 per photo for v1, 2 for v2), then cut to 77 tokens
   (without re-adding the end token) or pad with the tokenizer's pad id;
3. encode with both SDXL text encoders: penultimate states concatenated (2048 wide); pooled = the second
   encoder's projected output on this expanded prompt;
4. the ID encoder's fuse module rewrites the k-th repeated class token from its embedding and the k-th
   identity token; every other position is unchanged.

A *text-only* encoding (the trigger's token removed, no repetition, the usual truncation) conditions the
first steps, `i <= start_merge_step(style_strength, steps)`, the fused one the rest.

Ours vs the official: the official accepts exactly one trigger per prompt (one character). Here a prompt may
hold any number, each owned by a character with its own identity tokens: each trigger's class positions get
that character's identity (`trigger_owners` finds the owner of every trigger from the characters'
descriptions). A trigger with no identity (a character without photos) is removed and its class word kept
once, as in the text-only encoding. When two tokenizers disagree on positions (only when a prompt holds the
second tokenizer's pad character `!`), positions come from the second tokenizer, as in the official code.

Entry points for the story pipeline:
- `PhotoMaker.load(folder)`: a converted PhotoMaker (`python -m convert photomaker`);
- `IdentityEncoder(components, photomaker)`: `.identity_tokens(pixels, face_embeds)` once per character,
  `.encode(prompts, owners, identities)` once per story -> `IdentityConditioning` (text-only and fused
  contexts and pooled embeddings for every prompt);
- `start_merge_step(style_strength, steps)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checkpoints
from ..errors import CheckpointError, ConfigError
from ..images import clip_preprocess, load_image
from ..models.photomaker import PhotoMakerConfig, PhotoMakerIDEncoder
from ..params import build_with_params

TRIGGER_WORD = "img"
DEFAULT_STYLE_STRENGTH = 20.0   # percent, the official app's default
MAX_MERGE_STEP = 30             # the official cap on start_merge_step
MIN_PHOTO_SIDE = 64             # pixels: smaller photos hold no usable face


def start_merge_step(style_strength: float, steps: int) -> int:
    """Last denoising step that uses the text-only encoding: `min(int(style_strength / 100 * steps), 30)`."""
    if not 0 <= style_strength <= 100:
        raise ConfigError(f"style strength {style_strength} is outside 0..100; pass a percentage such as 20")
    return min(int(style_strength / 100 * steps), MAX_MERGE_STEP)


# ----------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class TriggerPrompt:
    """One prompt's token ids with its triggers resolved (one tokenizer)."""
    ids: np.ndarray                         # [max_length] int32: class words repeated (the fused encoding)
    text_only_ids: np.ndarray               # [max_length] int32: triggers removed, no repetition
    positions: tuple[tuple[int, ...], ...]  # per trigger: positions of its class tokens in `ids` to fuse


def count_triggers(text: str, trigger: str = TRIGGER_WORD) -> int:
    """How many times the trigger occurs, matched as the official tokenizer does (case-sensitive, anywhere)."""
    return text.count(trigger)


def expand_triggers(tokenizer, prompt: str, tokens_per_trigger: Sequence[int], *, trigger: str = TRIGGER_WORD,
                    max_length: int = 77) -> TriggerPrompt:
    """Token ids of `prompt` with each trigger's class token repeated `tokens_per_trigger[k]` times.

    The trigger is cut out of the raw text before tokenizing, like an added special token (the official
    `tokenizer.add_tokens([trigger], special_tokens=True)`): the text around it is tokenized piece by piece.
    A count of 0 removes the trigger and keeps its class word once, unfused.
    """
    pieces = prompt.split(trigger)
    if len(pieces) - 1 != len(tokens_per_trigger):
        raise ConfigError(f"prompt {prompt!r} holds {len(pieces) - 1} trigger words {trigger!r} but "
                          f"{len(tokens_per_trigger)} identities were given; write the trigger once after each "
                          "character's class word")
    body: list[int] = []       # tokens without BOS/EOS, triggers removed
    class_index: list[int] = []
    for k, piece in enumerate(pieces):
        body += tokenizer.encode(piece)
        if k < len(tokens_per_trigger):
            if not body or (class_index and class_index[-1] == len(body) - 1):
                raise ConfigError(f"prompt {prompt!r}: the trigger word {trigger!r} must follow a class word, "
                                  f"e.g. 'a woman {trigger}, ...'")
            class_index.append(len(body) - 1)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    text_only = [bos, *body[:max_length - 2], eos]
    expanded, positions = [bos], []
    for i, token in enumerate(body):
        if i in class_index:
            n = tokens_per_trigger[class_index.index(i)]
            positions.append(tuple(range(len(expanded), len(expanded) + n)))
            expanded += [token] * max(n, 1)
        else:
            expanded.append(token)
    expanded.append(eos)
    expanded = expanded[:max_length]  # the official cut: the end token may go
    for k, pos in enumerate(positions):
        if pos and pos[-1] >= max_length:
            raise ConfigError(f"prompt {prompt!r}: the class word of trigger {k + 1} falls past token {max_length} "
                              "once repeated for its photos; shorten the prompt or use fewer photos")

    def padded(ids: list[int]) -> np.ndarray:
        out = np.full((max_length,), pad, np.int32)
        out[:len(ids)] = ids
        return out

    return TriggerPrompt(padded(expanded), padded(text_only), tuple(positions))


def trigger_owners(prompt: str, descriptions: Mapping[str, str], *, trigger: str = TRIGGER_WORD) -> list[str | None]:
    """The character owning each trigger of `prompt`, in order: the one whose description contains it.

    descriptions: {name: description} of the characters whose descriptions carry the trigger. A trigger
    outside every description is None (it was typed into the panel text itself).
    """
    spans: list[tuple[int, int, str]] = []
    for name, text in descriptions.items():
        if trigger in text:
            spans += [(m.start(), m.end(), name) for m in re.finditer(re.escape(text), prompt)]
    owners = []
    for m in re.finditer(re.escape(trigger), prompt):
        owner = next((name for start, end, name in spans if start <= m.start() and m.end() <= end), None)
        owners.append(owner)
    return owners


def check_description(name: str, description: str, *, has_photos: bool, trigger: str = TRIGGER_WORD) -> None:
    """A character with photos needs exactly one trigger after its class word; one without needs none."""
    n = count_triggers(description, trigger)
    if has_photos and n == 0:
        raise ConfigError(f"character [{name}] has reference photos but its description has no trigger word "
                          f"{trigger!r}; write it after the class word, e.g. [{name}] a woman {trigger}, ...")
    if has_photos and n > 1:
        raise ConfigError(f"character [{name}]: the trigger word {trigger!r} occurs {n} times in its description; "
                          "write it once, after the class word")
    if not has_photos and n:
        raise ConfigError(f"character [{name}] has the trigger word {trigger!r} in its description but no photos; "
                          f"give photos with --ref {name}=photo.jpg or remove the trigger")


# ----------------------------------------------------------------------------------------------------
# Photos and face embeddings


def load_photos(paths: Sequence[str | os.PathLike], size: int = 224) -> np.ndarray:
    """Photo files -> CLIP-preprocessed pixels [N, size, size, 3] (PhotoMaker's CLIPImageProcessor defaults)."""
    if not paths:
        raise ConfigError("no reference photos given; pass at least one with --ref NAME=photo.jpg")
    images = []
    for path in paths:
        image = load_image(path)
        if min(image.size) < MIN_PHOTO_SIDE:
            raise ConfigError(f"reference photo {os.fspath(path)} is {image.size[0]}x{image.size[1]} pixels; use a "
                              f"photo at least {MIN_PHOTO_SIDE} pixels on each side showing the face")
        images.append(image)
    return clip_preprocess(images, size)


def load_face_embeds(path: str | os.PathLike, num_photos: int, dim: int = 512) -> np.ndarray:
    """A `.npy` of ArcFace embeddings, one row per photo in the photos' order: float32 [num_photos, dim].

    A row of NaNs (or of zeros) says "no face was found in this photo" (see `photos_with_faces`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"face embeddings {path} not found; pass a .npy file of [photos, {dim}] ArcFace embeddings")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"face embeddings {path} cannot be read ({str(e).splitlines()[0][:120]}); save them "
                          f"with numpy.save as a float array [photos, {dim}]") from None
    if arr.ndim == 1 and num_photos == 1:
        arr = arr[None]
    if arr.shape != (num_photos, dim) or not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"face embeddings {path} hold a {arr.dtype} array of shape {arr.shape}; expected float "
                          f"[{num_photos}, {dim}], one ArcFace embedding per photo in the order of the photos")
    return arr.astype(np.float32)


def photos_with_faces(paths: Sequence[str], face_embeds: np.ndarray, *, warn=print) -> tuple[list[int], np.ndarray]:
    """(indices of the photos that have a face, their embeddings). A photo without one (a row of NaNs or
    zeros) is dropped from both the CLIP and the face inputs, with a warning naming it; none left is an error."""
    has_face = np.all(np.isfinite(face_embeds), axis=1) & np.any(face_embeds != 0, axis=1)
    for i in np.flatnonzero(~has_face):
        warn(f"warning: no face found in reference photo {paths[i]}; it is left out")
    keep = [int(i) for i in np.flatnonzero(has_face)]
    if not keep:
        raise ConfigError(f"no face found in any reference photo ({', '.join(map(str, paths))}); use photos that "
                          "show the face clearly")
    return keep, face_embeds[keep]


# ----------------------------------------------------------------------------------------------------
# The converted PhotoMaker


@dataclass
class PhotoMaker:
    """A converted PhotoMaker folder: the ID encoder, and the path of its LoRA (merged into the SDXL U-Net
    at load time with `storydiff_jax.lora.apply_loras([(photomaker.lora_path, 1.0)])`)."""
    encoder: PhotoMakerIDEncoder
    config: PhotoMakerConfig
    lora_path: str
    trigger_word: str
    source: str

    @property
    def version(self) -> int:
        return self.config.version

    @classmethod
    def load(cls, folder: str, *, dtype=jnp.float32) -> PhotoMaker:
        index = checkpoints.read_index(folder)
        if index.get("arch") != "photomaker":
            raise CheckpointError(f"{folder}: a converted {index.get('arch')!r} model, not a PhotoMaker; convert one "
                                  "with `python -m convert photomaker --src photomaker-v1.bin --dst DIR`")
        config = PhotoMakerConfig.from_dict(checkpoints.read_json(folder, "id_encoder/config.json"))
        params = checkpoints.load_params(os.path.join(folder, "id_encoder", "params"))
        encoder = build_with_params(lambda: PhotoMakerIDEncoder(config, dtype=dtype), params, dtype=dtype,
                                    what=f"{folder}/id_encoder")
        lora = os.path.join(folder, index.get("lora", "lora_weights.safetensors"))
        if not os.path.isfile(lora):
            raise CheckpointError(f"{folder}: its LoRA file {os.path.basename(lora)} is missing; convert again")
        return cls(encoder, config, lora, index.get("trigger_word", TRIGGER_WORD), os.path.abspath(folder))


# ----------------------------------------------------------------------------------------------------
# Encoding


class IdentityConditioning(NamedTuple):
    """Per prompt: the text-only encoding (steps <= start_merge_step) and the fused one (after)."""
    text_context: jax.Array    # [B, 77, D]
    text_pooled: jax.Array     # [B, P]
    fused_context: jax.Array   # [B, 77, D]
    fused_pooled: jax.Array    # [B, P]


class PromptRows(NamedTuple):
    """A batch of prompts with their triggers resolved, ready to encode (numpy, one row per prompt)."""
    ids: np.ndarray            # [B, L] int32 first tokenizer, class words repeated (the fused encoding)
    ids2: np.ndarray           # [B, L] second tokenizer, the same
    text_ids: np.ndarray       # [B, L] first tokenizer, triggers removed (the text-only encoding)
    text_ids2: np.ndarray      # [B, L] second tokenizer, the same
    positions: np.ndarray      # [B, L] int32 positions to fuse, padded with L (past the end: dropped)
    tokens: np.ndarray         # [B, L, D] float32 the identity token for each position, zero-padded
    fused: np.ndarray          # [B] bool: the prompt has at least one identity to fuse


class IdentityEncoder:
    """SDXL prompt encoding with identity fusion, as jitted programs over the loaded models.

    One program encodes a batch of prompts whatever their photo counts: each prompt's fused positions come
    padded to the sequence length (padding points past the end and is dropped), so the shapes depend only
    on the batch size.

    place: `model -> (graph, state)`; default `nnx.split`. A pipeline passes its own, which puts the states on
    its device mesh (replicated), so these programs run where the pipeline's do.
    """

    def __init__(self, components, photomaker: PhotoMaker, *, place=nnx.split):
        if components.text_encoder_2 is None:
            raise ConfigError("PhotoMaker works with SDXL models only; this model is SD1.5")
        width = components.config.text_encoder.hidden_size + components.config.text_encoder_2.hidden_size
        if width != photomaker.config.embed_dim:
            raise ConfigError(f"PhotoMaker {photomaker.source} fuses {photomaker.config.embed_dim}-wide tokens but "
                              f"this model's text context is {width} wide; use a PhotoMaker made for SDXL")
        self.components, self.photomaker = components, photomaker
        self.trigger = photomaker.trigger_word
        self._te = place(components.text_encoder)
        self._te2 = place(components.text_encoder_2)
        self._pm = place(photomaker.encoder)
        self._encode = jax.jit(self._encode_program)
        self._tokens = jax.jit(self._tokens_program)

    @property
    def tokens_per_photo(self) -> int:
        return self.photomaker.config.tokens_per_photo

    def identity_tokens(self, pixels: np.ndarray, face_embeds: np.ndarray | None = None) -> jax.Array:
        """One character's photos -> its identity tokens [photos * tokens_per_photo, D], photo-major (the
        order the official fuse module consumes them in)."""
        if self.photomaker.version == 2 and face_embeds is None:
            raise ConfigError("PhotoMaker v2 needs face embeddings: pass --face-model DIR (insightface buffalo_l "
                              "models) or --face-embeds FILE.npy")
        tokens = self._tokens(self._pm[1], jnp.asarray(pixels),
                              None if face_embeds is None else jnp.asarray(face_embeds, jnp.float32))
        return tokens.reshape(-1, tokens.shape[-1])

    def _tokens_program(self, pm_state, pixels, face_embeds):
        return nnx.merge(self._pm[0], pm_state).id_embeds(pixels, face_embeds)

    def prompt_rows(self, prompts: Sequence[str], owners: Sequence[Sequence[str | None]],
                    identities: Mapping[str, jax.Array]) -> PromptRows:
        """Token ids and fuse inputs of prompts whose triggers are owned by characters (`trigger_owners`);
        identities: {name: identity_tokens(...)}. A trigger owned by None or by a character absent from
        `identities` stays text."""
        c = self.components
        length = c.config.text_encoder.max_position_embeddings
        width = self.photomaker.config.embed_dim
        rows = {k: [] for k in PromptRows._fields}
        for prompt, who in zip(prompts, owners, strict=True):
            counts = [int(identities[o].shape[0]) if o in identities else 0 for o in who]
            first = expand_triggers(c.tokenizer, prompt, counts, trigger=self.trigger, max_length=length)
            second = expand_triggers(c.tokenizer_2, prompt, counts, trigger=self.trigger, max_length=length)
            pos = np.full((length,), length, np.int32)          # "length" = past the end: dropped
            tok = np.zeros((length, width), np.float32)
            flat = [p for ps in second.positions for p in ps]
            pos[:len(flat)] = flat
            n = 0
            for o, ps in zip(who, second.positions):
                if ps:
                    tok[n:n + len(ps)] = np.asarray(identities[o])
                    n += len(ps)
            for k, v in (("ids", first.ids), ("ids2", second.ids), ("text_ids", first.text_only_ids),
                         ("text_ids2", second.text_only_ids), ("positions", pos), ("tokens", tok),
                         ("fused", bool(flat))):
                rows[k].append(v)
        return PromptRows(**{k: np.stack(v) if k != "fused" else np.array(v, bool) for k, v in rows.items()})

    def encode(self, prompts: Sequence[str], owners: Sequence[Sequence[str | None]],
               identities: Mapping[str, jax.Array], *, text_states=None) -> IdentityConditioning:
        """Encode prompts whose triggers are owned by characters (`trigger_owners`); identities: {name:
        identity_tokens(...)}. A trigger owned by None or by a character absent from `identities` stays text.
        text_states: (first, second) text encoder states to use instead of the loaded ones (the same networks
        with other weights, e.g. LoRAs merged)."""
        r = self.prompt_rows(prompts, owners, identities)
        none = np.full_like(r.positions, r.positions.shape[1])
        text_ctx, text_pooled = self.encode_rows(r.text_ids, r.text_ids2, none, r.tokens, text_states=text_states)
        fused_ctx, fused_pooled = self.encode_rows(r.ids, r.ids2, r.positions, r.tokens, text_states=text_states)
        return IdentityConditioning(text_ctx, text_pooled, fused_ctx, fused_pooled)

    def encode_rows(self, ids, ids2, positions, tokens, *, text_states=None) -> tuple[jax.Array, jax.Array]:
        """(context [B, L, D], pooled [B, P]) of token ids with `tokens` fused at `positions` (see PromptRows)."""
        te, te2 = text_states if text_states is not None else (self._te[1], self._te2[1])
        return self._encode(te, te2, self._pm[1], jnp.asarray(ids), jnp.asarray(ids2), jnp.asarray(positions),
                            jnp.asarray(tokens))

    def _encode_program(self, te_state, te2_state, pm_state, ids, ids2, positions, tokens):
        out1 = nnx.merge(self._te[0], te_state)(ids)
        out2 = nnx.merge(self._te2[0], te2_state)(ids2)
        ctx = jnp.concatenate([out1.penultimate, out2.penultimate], axis=-1)
        rows = jnp.arange(ctx.shape[0])[:, None]
        class_embeds = ctx.at[rows, positions].get(mode="fill", fill_value=0)
        fused = nnx.merge(self._pm[0], pm_state).fuse(class_embeds, tokens.astype(ctx.dtype))
        return ctx.at[rows, positions].set(fused.astype(ctx.dtype), mode="drop"), out2.pooled
