"""End to end on the tiny preset through the Python API: StoryPipeline (shapes, determinism, banks, modes).

Random-weight tiny model at 64x64 and 3 steps: pictures are noise, but every phase runs for real.
"""


import numpy as np
import pytest
from story_samples import STORY

from storydiff_jax.errors import ConfigError
from storydiff_jax.pipelines import StoryOptions, StoryPipeline
from storydiff_jax.pipelines.bank import CharacterBank


@pytest.fixture(scope="module")
def pipe():
    return StoryPipeline.from_pretrained("tiny-sdxl")


def opts(**kw):
    base = dict(steps=3, height=64, width=64, id_length=2, layout="four-panel")
    base.update(kw)
    return StoryOptions(**base)


def arrays(result):
    return [np.asarray(p) for p in result.panels]


def test_panels_pages_and_determinism(pipe):
    a = pipe(STORY, opts(seed=1), progress=False)
    assert len(a.panels) == 7 and all(p.size == (64, 64) for p in a.panels)
    assert len(a.pages) == 2                      # four-panel: 7 panels -> 2 pages of 2x2
    assert a.story.id_panels == {"Ana": [0, 2], "Bo": [1, 3]}
    b = pipe(STORY, opts(seed=1), progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b))), "same seed must give the same pixels"
    compiled = {k: f._cache_size() for k, f in pipe._programs.items()}
    c = pipe(STORY, opts(seed=2), progress=False)
    assert not any(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(c))), "a new seed must change panels"
    # ...but not the programs: key capacities come from the rate, not the draw (`csa.capacity_bound`).
    assert {k: f._cache_size() for k, f in pipe._programs.items()} == compiled
    # The bank holds both characters, K valid tokens per step at rate ~0.5 of 2 id images' tokens.
    bank = a.bank
    assert list(bank.characters) == ["Ana", "Bo"]
    steps, chars, halves, k, _ = bank.tokens[0].shape
    assert (steps, chars, halves) == (3, 2, 2)
    tokens_per_image = bank.layer_tokens[0]
    frac = bank.valid[tokens_per_image].sum(-1) / (2 * tokens_per_image)
    assert np.all((frac > 0.2) & (frac < 0.8)), frac


def test_csa_changes_read_panels_but_rate_zero_is_plain(pipe):
    """sa=0 stores no tokens: read panels then equal plain generation; sa=1 changes them."""
    plain = arrays(pipe(STORY, opts(sa32=0.0, sa64=0.0), progress=False))
    csa = arrays(pipe(STORY, opts(sa32=1.0, sa64=1.0), progress=False))
    nc_panel = 5
    assert np.array_equal(plain[nc_panel], csa[nc_panel]), "[NC] panels use plain attention"
    assert not np.array_equal(plain[4], csa[4]), "a character panel must see its bank"


def test_bank_round_trip(pipe, tmp_path):
    first = pipe(STORY, opts(seed=3), progress=False)
    path = tmp_path / "chars.npz"
    first.bank.save(str(path))
    bank = CharacterBank.load(str(path))
    assert bank.characters == first.bank.characters
    assert all(np.array_equal(a, b) for a, b in zip(bank.tokens, first.bank.tokens))
    # Reading a host-memory (offloaded) bank gives the same panels as reading it from device memory.
    second = pipe(STORY, opts(seed=3, bank_offload=True), bank=bank, progress=False)
    assert second.story.id_panels == {}, "characters from a loaded bank need no id panels"
    for i in first.story.read_panels():
        assert np.array_equal(np.asarray(first.panels[i]), np.asarray(second.panels[i])), i
    with pytest.raises(ConfigError, match="steps"):
        pipe(STORY, opts(seed=3, steps=2), bank=bank, progress=False)


# Window mode in chunks (windows crossing a chunk boundary use carried tokens); one compiled program for the two
# window tests below with CSA on.
WINDOW = dict(mode="window", window=2, chunk=2)


def test_window_mode_runs_and_is_deterministic(pipe):
    a = pipe(STORY, opts(**WINDOW), progress=False)
    b = pipe(STORY, opts(**WINDOW), progress=False)
    assert len(a.panels) == 7 and a.bank is None
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))


def test_window_mode_relates_panels_sharing_a_character_in_a_window(pipe):
    """Algorithm 1 inside the pipeline: CSA on vs sampling rate 0 (plain attention), final latents.

    Window 2, chunks of 2 panels. STORY's panels: 0 Ana, 1 Bo, 2 Ana, 3 Bo, 4 Ana+Bo, 5 [NC], 6 Ana. A window
    counts for the panels of the chunk holding its last panel (docs/consistent_self_attention.md, "chunks"), so
    the only window relating two panels of its own chunk's panel is {3, 4}, computed with chunk {4, 5} and panel
    3's carried tokens: panel 4 must change. Every other panel must not: the [NC] panel 5, panels 0 and 2 (Ana
    twice, never in one window), panel 6 (Ana, its window holds the [NC] panel), panel 3 (its window {3, 4} is
    in the next chunk: the documented price of chunking). A pipeline that related nobody, everybody, or no
    window (all-False / all-True `related`, no `valid` window, no carry) fails here.
    """
    on = pipe(STORY, opts(**WINDOW), progress=False).latents
    off = pipe(STORY, opts(**WINDOW, sa32=0.0, sa64=0.0), progress=False).latents
    # Measured (2 CPU cores): unchanged panels 1.4e-5..1.8e-5 (float noise: other batch layouts), panel 4 0.116,
    # of latents up to 21.7: bounds 1e-5 and 1e-3 of that scale.
    change = np.abs(on - off).reshape(len(on), -1).max(-1)
    scale = max(1.0, float(np.abs(off).max()))
    print(f"\nwindow mode, CSA on vs rate 0, max |latent change| per panel: {np.array2string(change, precision=3)} "
          f"(latents up to {scale:.3g})")
    assert change[4] > 1e-3 * scale, change
    assert np.all(np.delete(change, 4) <= 1e-5 * scale), change


def test_size_must_be_multiple_of_32(pipe):
    with pytest.raises(ConfigError, match="multiple of 32"):
        pipe(STORY, opts(height=70), progress=False)


def test_sd15_story_with_odd_latent_sides():
    """SD1.5 topology (CSA at three up-block resolutions); 96 px -> latent 12 -> 6 -> 3 -> 2 and back."""
    sd15 = StoryPipeline.from_pretrained("tiny-sd15")
    result = sd15(STORY, opts(height=96, width=96, steps=2), progress=False)
    assert len(result.panels) == 7 and all(p.size == (96, 96) for p in result.panels)
    assert result.info["layer_tokens"] == [9, 9, 36, 36, 144, 144]
    assert len({np.asarray(p).tobytes() for p in result.panels}) > 1


def test_progress_is_per_run_and_ticks_from_the_step_loop(pipe):
    """A run's own listener sees its phases step by step, on the caller's thread: the ticks come from the loop that
    calls the denoising programs once per step (no host callback inside them, so JAX's persistent cache can keep
    them), and watching changes neither the programs nor the pixels."""
    import threading

    from storydiff_jax.pipelines.progress import Progress

    seen = []
    listener = lambda *tick: seen.append((*tick, threading.get_ident()))  # noqa: E731
    watched = pipe(STORY, opts(seed=1), progress=Progress(listener=listener))
    quiet = pipe(STORY, opts(seed=1), progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(arrays(watched), arrays(quiet)))
    assert np.array_equal(watched.latents, quiet.latents) and watched.latents.shape == (7, 8, 8, 4)
    assert [phase for phase, done, _, _ in seen if done == 0] == ["write Ana", "write Bo", "read", "decode"]
    assert [done for phase, done, _, _ in seen if phase == "write Ana"] == [0, 1, 2, 3]
    assert seen[-1][:3] == ("decode", 7, 7) and {t for *_, t in seen} == {threading.get_ident()}
