"""Pure step functions: one optimiser step, one evaluation step. The trainer jits them with shardings.

They are module-level and take everything static as keywords, so the caller binds them with
`functools.partial` and `jax.jit(..., in_shardings=..., out_shardings=..., donate_argnums=0)` (scenic style);
nothing here knows about meshes, files or configs beyond the loss's ConfigDict.

Randomness (dropout, drop-path) is `fold_in(PRNGKey(seed), step)`: a pure function of the step, so a run resumed
from a checkpoint draws exactly the numbers the uninterrupted run drew.

Guard: when the loss or any gradient is NaN/inf the update is skipped (the state comes back unchanged) and
`metrics["nonfinite"]` is 1, so the loop can stop and name the step and the batch while the last checkpoint is
still a good one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

# The batch keys the model reads (the rest of the batch contract is ground truth and bookkeeping).
MODEL_INPUT_KEYS = ("image", "text_ids", "text_attention_mask", "ref_image", "ref_prompt", "has_text",
                    "has_visual")
LossFn = Callable[[dict, dict, Any], tuple[jax.Array, dict]]


class TrainState(struct.PyTreeNode):
  """What a step changes: the step counter, the parameters (plain arrays) and the optimiser state."""

  step: jax.Array
  params: Any
  opt_state: Any


def model_inputs(batch: dict[str, jax.Array], prompts: tuple[str, ...] = ("text", "visual")) -> dict[str, Any]:
  """The model's keyword inputs from a batch; a modality missing from `prompts` is not encoded at all.

  Stage 1 (text data only) passes `prompts=('text',)`, which skips the reference image's Swin pass.
  """
  inputs = {key: batch[key] for key in MODEL_INPUT_KEYS}
  if "text" not in prompts:
    inputs.update(text_ids=None, text_attention_mask=None)
  if "visual" not in prompts:
    inputs.update(ref_image=None, ref_prompt=None)
  return inputs


def _default_loss_fn() -> LossFn:
  from omniris_jax import losses  # pylint: disable=g-import-not-at-top  (one loss module; imported at trace time)
  return losses.compute_losses


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, loss_config: Any, seed: int,
               prompts: tuple[str, ...] = ("text", "visual"),
               loss_fn: LossFn | None = None,
               frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on one global batch.

  Args:
    state: the current TrainState.
    batch: a batch of the batch contract (data/pipeline.py), as global arrays.
    model: the OmniSegNet module.
    tx: the optimiser (optim.make_optimizer).
    loss_config: `config.loss`, passed to the loss function.
    seed: the run's seed; dropout keys are fold_in(PRNGKey(seed), step).
    prompts: which prompt encoders run ('text', 'visual'); see `model_inputs`.
    loss_fn: (outputs, batch, loss_config) -> (loss, metrics); default `losses.compute_losses`.
    frozen: a tree of bools shaped like the parameters (optim.frozen_mask), True where `tx` freezes the leaf;
      None: all trainable. Frozen leaves are not differentiated and come back as the very buffers they were
      (the demo's frozen 22.6M-parameter MiniLM is 87% of its parameters: differentiating it and passing the
      update over it cost 19-23% of a demo step, `benchmarks/train_step.py --compare_all_leaves`).

  Returns:
    (the new state, scalar metrics: loss, the loss's own terms, grad_norm, nonfinite).
  """
  loss_fn = loss_fn or _default_loss_fn()
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

  leaves, treedef = jax.tree.flatten(state.params)
  is_frozen = [False] * len(leaves) if frozen is None else treedef.flatten_up_to(frozen)
  trained = [i for i, f in enumerate(is_frozen) if not f]

  def with_trained(base, trained_values):
    """The tree of `base` leaves with the trained positions replaced by `trained_values`."""
    merged = list(base)
    for i, value in zip(trained, trained_values):
      merged[i] = value
    return treedef.unflatten(merged)

  def objective(trained_leaves):
    outputs = model.apply({"params": with_trained(leaves, trained_leaves)}, **model_inputs(batch, prompts),
                          deterministic=False, rngs={"dropout": dropout_rng})
    loss, loss_metrics = loss_fn(outputs, batch, loss_config)
    return loss, loss_metrics

  (loss, loss_metrics), trained_grads = jax.value_and_grad(objective, has_aux=True)([leaves[i] for i in trained])
  grad_norm = optax.global_norm(trained_grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # The optimiser sees a full gradient tree; its frozen branch (optax.set_to_zero) never reads these zeros.
  grads = with_trained([jnp.zeros_like(leaf) for leaf in leaves], trained_grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  update_leaves = treedef.flatten_up_to(updates)
  # Skip the update when anything is NaN/inf: the caller stops, and the state is still the last good one.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_params = with_trained(leaves, [keep(optax.apply_updates(leaves[i], update_leaves[i]), leaves[i])
                                     for i in trained])
  new_state = TrainState(step=state.step + 1, params=new_params, opt_state=keep(new_opt_state, state.opt_state))
  metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32), **loss_metrics}
  return new_state, metrics


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, h, w, C) logits bilinearly resized to (B, *size, C), as ReLA upsamples before the argmax."""
  return jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), method="bilinear")


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              prompts: tuple[str, ...] = ("text", "visual")) -> dict[str, jax.Array]:
  """Predictions for one batch: masks at the batch's resolution and the no-target call.

  Returns:
    {"pred_mask": (B, S, S) bool, the argmax of the upsampled combined mask logits,
     "pred_nt": (B,) bool, the argmax of the combined no-target logits}.
  """
  outputs = model.apply({"params": params}, **model_inputs(batch, prompts), deterministic=True)
  size = batch["image"].shape[1:3]
  mask_logits = upsample_logits(outputs["mask_logits"].astype(jnp.float32), size)
  return {"pred_mask": jnp.argmax(mask_logits, axis=-1).astype(bool),
          "pred_nt": jnp.argmax(outputs["nt_logits"], axis=-1).astype(bool)}
