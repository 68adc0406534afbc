"""`python -m train export`: a training run's newest checkpoint -> a converted video folder.

The folder has the layout `python -m convert video` writes (model_index.json, per-component config.json and
orbax params, scheduler, tokenizer), with the trained SMP, image projection, IP-Adapter layers and motion
modules in place of the model's, so `python -m infer.transition --model DST` renders with them.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from storydiff_jax.errors import CheckpointError


def export(workdir: str, dst: str, *, overwrite: bool = False, log=print) -> str:
    from storydiff_jax.checkpoints import PipelineWriter
    from storydiff_jax.pipelines.components import preset_tokenizer_dir
    from storydiff_jax.pipelines.video_components import PRESETS, load_video_components

    from .config import read_run
    from .loop import checkpoint_manager, read_state
    from .step import all_values, flatten, smp_config_for

    cfg = read_run(workdir)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"--dst {dst} already exists; choose another --dst or pass --overwrite")
    manager = checkpoint_manager(workdir, cfg, read_only=True)
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"--workdir {workdir} has no checkpoint yet; train for --save-every steps first")
    manager.close()
    trained = read_state(workdir, step)["params"]
    components = load_video_components(cfg.model)
    config = dataclasses.replace(components.config, smp=smp_config_for(components.config))

    tokenizer = (preset_tokenizer_dir("<|endoftext|>") if cfg.model in PRESETS
                 else os.path.join(cfg.model, "tokenizer"))
    with PipelineWriter(dst, overwrite=overwrite) as writer:
        for name in config.components:
            model = getattr(components, name)
            values = {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                      else np.asarray(v) for k, v in all_values(model).items()} if model is not None else {}
            values.update({k: np.asarray(v) for k, v in flatten(trained.get(name, {})).items()})
            writer.write_params(name, values)
            writer.write_json(f"{name}/config.json", config.component_config(name).to_dict())
        writer.write_json("scheduler/scheduler_config.json", config.scheduler.to_dict())
        writer.copy_dir(tokenizer, "tokenizer")
        out = writer.commit({**config.to_index(), "dtype": "float32",
                             "sources": {"model": cfg.model, "trained": os.path.abspath(workdir), "step": step}})
    log(f"exported step {step} of {workdir} -> {out} (trained: {', '.join(sorted(trained))}; render with "
        f"`python -m infer.transition --model {dst}`)")
    return out
