"""The Pallas deformable-attention kernels equal the jnp reference, lower for GPU, and refuse TPU clearly.

Correctness runs the kernels in Pallas' interpreter on CPU (forward and the gradients w.r.t. value, sampling
locations and attention weights) over a sample of the product of level layouts, heads, points, queries, head
widths and dtypes, against `deform_attn.multi_scale_deformable_attention(implementation="xla")` (itself pinned
to torch's grid_sample in test_deform_attn.py). The reference always runs in float32 on the (rounded) inputs,
so the bf16 tolerance measures what the kernel's bf16 inputs/outputs cost, not a second bf16 computation.

Tolerances: float32 rtol = atol = 2e-5 of each array's scale (both sides accumulate in float32; only the
summation order differs). bf16: 1e-2 x max|reference| (the output and the returned gradients are rounded to
bf16, relative step 2^-8 = 0.4%, on values that are sums of up to L*P*4 terms).

Lowering without hardware: `jax.export.export(..., platforms=["cuda"])` runs Pallas' Triton lowering on this CPU
machine (the kernel IR is embedded in the `__gpu$xla.gpu.triton` custom call; PTX compilation itself happens on
the GPU host). TPU has no lowering (see the kernel module's docstring); that is pinned both ways.
"""

from __future__ import annotations

import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import mesh as mesh_lib

from omniris_jax.kernels import deform_attn_pallas
from omniris_jax.models import deform_attn

BLOCK_Q = 8  # Small so that the sampled query counts exercise padding and several query blocks.

# The shape product: level layouts (non-square, 1x1, single-row/column, one level), heads, points, queries
# (13 and 21 are not multiples of BLOCK_Q, 5 is below it, 16 is two whole blocks), head widths.
LEVEL_LAYOUTS = (((6, 9), (3, 4), (1, 1)), ((5, 3), (1, 7), (2, 2), (1, 1)), ((4, 4),))
HEADS = (1, 3)
POINTS = (1, 4)
QUERIES = (5, 13, 16, 21)
HEAD_DIMS = (4, 8)
CASES_PER_DTYPE = 3
# The first seed for which every dtype's sample passes test_sample_covers_the_cases_that_matter.
SAMPLE_SEED = 3
_TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}


def _sampled_cases():
  """A fixed-seed sample of the product per dtype: each case is one interpret-mode compile (~5 s)."""
  product = list(itertools.product(range(len(LEVEL_LAYOUTS)), HEADS, POINTS, QUERIES, HEAD_DIMS))
  rng = random.Random(SAMPLE_SEED)
  cases = []
  for dtype in ("float32", "bfloat16"):
    for layout, heads, points, queries, head_dim in rng.sample(product, CASES_PER_DTYPE):
      cases.append((dtype, LEVEL_LAYOUTS[layout], heads, points, queries, head_dim))
  return cases


CASES = _sampled_cases()
CASE_IDS = [f"{d}-L{len(s)}-h{h}-p{p}-q{q}-d{c}" for d, s, h, p, q, c in CASES]


def _random_inputs(spatial_shapes, heads, points, queries, head_dim, dtype, seed=0):
  """Inputs like the model's: locations spread over [-0.3, 1.3] so corners and whole points leave the maps."""
  rng = np.random.default_rng(seed)
  num_values = sum(h * w for h, w in spatial_shapes)
  levels = len(spatial_shapes)
  value = rng.standard_normal((2, num_values, heads, head_dim))
  locations = rng.uniform(-0.3, 1.3, (2, queries, heads, levels, points, 2))
  weights = rng.uniform(0.0, 1.0, (2, queries, heads, levels, points))
  cotangent = rng.standard_normal((2, queries, heads * head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (value, locations, weights)) + (jnp.asarray(cotangent, dtype),)


def _output_and_grads(implementation, spatial_shapes, value, locations, weights, cotangent):
  """Output and the gradients of <output, cotangent> w.r.t. value, locations, weights (one jit)."""

  def loss(value, locations, weights):
    output = implementation(value, spatial_shapes, locations, weights)
    return jnp.sum(output.astype(jnp.float32) * cotangent.astype(jnp.float32)), output

  # "highest": on a GPU the reference's float32 einsum would otherwise be allowed TF32.
  with jax.default_matmul_precision("highest"):
    grads, output = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(value, locations, weights)
  return [np.asarray(x, np.float32) for x in (output, *grads)]


def _pallas(block_q=BLOCK_Q):
  """The kernels in interpret mode, on any host (compiled runs have their own, GPU-only test)."""
  def run(value, spatial_shapes, locations, weights):
    return deform_attn_pallas.multi_scale_deformable_attention_pallas(
        value, spatial_shapes, locations, weights, block_sizes=deform_attn_pallas.BlockSizes(block_q=block_q),
        interpret=True)
  return run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sample_covers_the_cases_that_matter(dtype):
  """Guards the sample: each dtype must see padding over several blocks, non-square levels with a 1x1 one,
  several heads and several points."""
  cases = [case[1:] for case in CASES if case[0] == dtype]
  assert len(cases) == CASES_PER_DTYPE
  assert any(q % BLOCK_Q and q > BLOCK_Q for *_, q, _ in cases)
  assert any((1, 1) in s and any(h != w for h, w in s) for s, *_ in cases)
  assert any(h > 1 for _, h, *_ in cases) and any(p > 1 for _, _, p, *_ in cases)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_interpret_matches_reference_forward_and_gradients(case):
  dtype, spatial_shapes, heads, points, queries, head_dim = case
  inputs = _random_inputs(spatial_shapes, heads, points, queries, head_dim, dtype)
  assert (np.asarray(inputs[1], np.float32) < 0).any() and (np.asarray(inputs[1], np.float32) > 1).any()
  ours = _output_and_grads(_pallas(), spatial_shapes, *inputs)
  # The reference sees exactly the kernel's (possibly bf16-rounded) inputs, in float32.
  reference = _output_and_grads(deform_attn.multi_scale_deformable_attention, spatial_shapes,
                                *(x.astype(jnp.float32) for x in inputs))
  tolerance = _TOLERANCE[dtype]
  for name, got, expected in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights"),
                                 ours, reference):
    assert got.shape == expected.shape, name
    scale = np.abs(expected).max()
    assert scale > 0.1, f"{name} reference is degenerate"
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * scale, err_msg=f"{case} {name}")


def test_interpret_output_has_value_dtype_and_grads_have_input_dtypes():
  spatial_shapes = ((3, 5), (1, 1))
  value, locations, weights, cotangent = _random_inputs(spatial_shapes, 2, 2, 3, 4, "bfloat16")
  locations = locations.astype(jnp.float32)  # the model's mix: bf16 values and weights, f32 locations
  output, vjp = jax.vjp(_pallas(), value, spatial_shapes, locations, weights)
  grads = vjp(cotangent)
  assert output.dtype == jnp.bfloat16 and output.shape == (2, 3, 8)
  assert [g.dtype for g in (grads[0], grads[2], grads[3])] == [jnp.bfloat16, jnp.float32, jnp.bfloat16]


# ----------------------------------------------------------------------------------------------------------
# The model selects the kernel by name
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(jax.default_backend() == "tpu", reason="the pallas kernel has no TPU lowering (refused by "
                    "test_tpu_is_refused_with_a_pointer_to_xla); the module would raise there by design")
def test_msdeformattn_with_pallas_equals_xla():
  """implementation="pallas" in the module config goes through the registry and changes nothing numerically."""
  spatial_shapes = ((4, 6), (2, 3), (1, 1))
  dim, heads, points, queries = 16, 4, 3, 11
  rng = np.random.default_rng(3)
  num_values = sum(h * w for h, w in spatial_shapes)
  query = jnp.asarray(rng.standard_normal((2, queries, dim)), jnp.float32)
  reference_points = jnp.asarray(rng.uniform(0, 1, (2, queries, len(spatial_shapes), 2)), jnp.float32)
  value_input = jnp.asarray(rng.standard_normal((2, num_values, dim)), jnp.float32)
  xla_module = deform_attn.MSDeformAttn(dim, heads, len(spatial_shapes), points, implementation="xla")
  pallas_module = deform_attn.MSDeformAttn(dim, heads, len(spatial_shapes), points, implementation="pallas")
  params = xla_module.init(jax.random.key(0), query, reference_points, value_input, spatial_shapes)
  # Non-zero offset and attention kernels, so samples move with the query (init has them at zero).
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  with jax.default_matmul_precision("highest"):  # no TF32 on a GPU host: both sides in true float32
    expected = xla_module.apply(params, query, reference_points, value_input, spatial_shapes)
    got = jax.jit(lambda p: pallas_module.apply(p, query, reference_points, value_input, spatial_shapes))(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)
  assert "pallas" in deform_attn.available_implementations()


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8 fake CPU devices of conftest.py")
def test_under_a_mesh_each_device_runs_its_own_batch_and_heads():
  """Under the trainer's mesh and rules the kernels run per shard (shard_map), not gathered onto every device."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from omniris_jax import sharding  # pylint: disable=import-outside-toplevel
  spatial_shapes = ((6, 9), (3, 4))
  value, locations, weights, cotangent = _random_inputs(spatial_shapes, 2, 2, 13, 4, "float32")
  value, locations, weights, cotangent = (jnp.concatenate([x, x + 0.5]) for x in (value, locations, weights,
                                                                                   cotangent))  # batch 4
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    ours = jax.jit(jax.grad(lambda v: jnp.sum(_pallas()(v, spatial_shapes, locations, weights) * cotangent)))(
        value)
    expected = jax.jit(jax.grad(lambda v: jnp.sum(deform_attn.multi_scale_deformable_attention(
        v, spatial_shapes, locations, weights) * cotangent)))(value)
  assert ours.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "model")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_inputs():
  return _random_inputs(((3, 4), (1, 1)), 2, 2, 5, 4, "float32")[:3]


def test_bad_block_size_is_explained(small_inputs):
  value, locations, weights = small_inputs
  with pytest.raises(ValueError, match=r"block_sizes.block_q=6 must be a power of two"):
    deform_attn_pallas.multi_scale_deformable_attention_pallas(
        value, ((3, 4), (1, 1)), locations, weights, block_sizes=deform_attn_pallas.BlockSizes(block_q=6))


def test_shape_and_dtype_errors_name_the_argument(small_inputs):
  value, locations, weights = small_inputs
  with pytest.raises(ValueError, match="flatten each level"):
    deform_attn_pallas.multi_scale_deformable_attention_pallas(value, ((3, 3), (1, 1)), locations, weights)
  with pytest.raises(ValueError, match=r"attention_weights.dtype=int32 must be floating point"):
    deform_attn_pallas.multi_scale_deformable_attention_pallas(value, ((3, 4), (1, 1)), locations,
                                                               weights.astype(jnp.int32))


def test_compiled_head_dim_must_be_a_power_of_two():
  value, locations, weights, _ = _random_inputs(((2, 2),), 1, 1, 4, 6, "float32")
  with pytest.raises(ValueError, match=r"head_dim=6 .* power of two .*implementation='xla'"):
    deform_attn_pallas.multi_scale_deformable_attention_pallas(value, ((2, 2),), locations, weights,
                                                               interpret=False, backend="gpu")


def test_tpu_is_refused_with_a_pointer_to_xla(small_inputs):
  value, locations, weights = small_inputs
  with pytest.raises(ValueError, match=r"no TPU lowering.*implementation='xla'"):
    deform_attn_pallas.multi_scale_deformable_attention_pallas(value, ((3, 4), (1, 1)), locations, weights,
                                                               interpret=False, backend="tpu")


# ----------------------------------------------------------------------------------------------------------
# Lowering for real backends, on this CPU machine
# ----------------------------------------------------------------------------------------------------------
# The paper's pixel-encoder layout at batch 1 (levels 60x60, 30x30, 15x15; 8 heads of 32; 4 points), with the
# model's dtypes: bf16 values and weights, float32 locations.
LOWERING_SHAPES = ((60, 60), (30, 30), (15, 15))
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _abstract_inputs(heads=8, head_dim=32, points=4):
  num_values = sum(h * w for h, w in LOWERING_SHAPES)
  levels = len(LOWERING_SHAPES)
  return (jax.ShapeDtypeStruct((1, num_values, heads, head_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, num_values, heads, levels, points, 2), jnp.float32),
          jax.ShapeDtypeStruct((1, num_values, heads, levels, points), jnp.bfloat16))


def _forward_and_backward(backend):
  def forward(value, locations, weights):
    return deform_attn_pallas.multi_scale_deformable_attention_pallas(
        value, LOWERING_SHAPES, locations, weights, interpret=False, backend=backend)

  def forward_and_backward(value, locations, weights):
    output, vjp = jax.vjp(forward, value, locations, weights)
    return output, vjp(jnp.ones_like(output))

  return forward_and_backward


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_forward_and_backward_lower_through_triton(platform):
  exported = jax.export.export(
      jax.jit(_forward_and_backward("gpu")), platforms=[platform],
      # Triton calls carry no serialisation-compatibility guarantee; we only inspect the module.
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*_abstract_inputs())
  module = exported.mlir_module()
  assert module.count(f"@{_TRITON_CALL}") == 2
  assert 'name = "deform_attn_forward"' in module and 'name = "deform_attn_backward"' in module
  # The value gradient is a float32 buffer updated in place by atomics, aliased to a zero-filled input.
  assert "atomic_rmw" in module and "output_operand_aliases" in module


def _tpu_abstract_mesh():
  device = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


@pytest.mark.xfail(strict=True, raises=Exception, reason=(
    "No Mosaic TPU lowering in jax 0.10.2: the kernel gathers value rows at data-dependent indices "
    "(value_ref[rows, :]), which Mosaic rejects ('Cannot do int indexing on TPU'; only take_along_axis-like "
    "in-register gathers lower), and its (S, head_dim) per-head block squeezes the heads axis out of the "
    "second-minor dimension, which breaks TPU's (8, 128) block tiling rule. Strict: if a later jax lowers it, "
    "this turns red and the TPU refusal in _check_kernel_inputs should be revisited."))
def test_kernel_lowers_for_tpu():
  # The raw kernel, past the TPU refusal in the public op.  pylint: disable=protected-access
  config = deform_attn_pallas._Config(LOWERING_SHAPES, deform_attn_pallas.BlockSizes(block_q=128),
                                      interpret=False, backend="tpu")
  with jax.sharding.use_abstract_mesh(_tpu_abstract_mesh()):
    jax.export.export(jax.jit(lambda *a: deform_attn_pallas._forward(config, *a)),  # pylint: disable=protected-access
                      platforms=["tpu"])(*_abstract_inputs(heads=1, head_dim=128))


# ----------------------------------------------------------------------------------------------------------
# Compiled kernels (GPU only)
# ----------------------------------------------------------------------------------------------------------
_ON_GPU = jax.default_backend() in ("gpu", "cuda", "rocm")


@pytest.mark.accelerator
@pytest.mark.skipif(not _ON_GPU, reason="compiled Pallas kernels need a GPU (Triton); this host runs "
                    f"{jax.default_backend()!r}, where only interpret mode exists (TPU: no lowering, see above)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_matches_reference_on_gpu(dtype):
  spatial_shapes = ((30, 30), (15, 15), (8, 8), (1, 1))
  inputs = _random_inputs(spatial_shapes, 8, 4, 1000, 32, dtype)

  def compiled(value, spatial_shapes, locations, weights):
    return deform_attn_pallas.multi_scale_deformable_attention_pallas(value, spatial_shapes, locations, weights,
                                                                      interpret=False)

  ours = _output_and_grads(compiled, spatial_shapes, *inputs)
  reference = _output_and_grads(deform_attn.multi_scale_deformable_attention, spatial_shapes,
                                *(x.astype(jnp.float32) for x in inputs))
  # float32: 1e-4 leaves room for the atomics' run-to-run summation order over up to thousands of terms.
  tolerance = max(_TOLERANCE[dtype], 1e-4)
  for got, expected in zip(ours, reference):
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
