"""Whether DeepSpeed's kernel injection (HybridEngine, `init_inference(replace_with_kernel_inject=True)`)
can run with the installed libraries.

What bench/gpu_smoke.py found on an H200 (its result in bench/results/): DeepSpeed 0.19.8's
injected OPT/GPT layers return tuples and keep their own KV cache, while transformers 5 decoders
expect a tensor from each layer and pass a `Cache` object — the second layer fails with "'tuple'
object has no attribute 'size'", and positions would be wrong even past that. So injection is
refused up front with transformers ≥ 5 rather than failing in the middle of a generation.
"""

from __future__ import annotations


def injection_unsupported() -> str | None:
    """Why kernel injection cannot run here, or None when the installed versions allow it."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        try:
            import deepspeed

            ds = f"DeepSpeed {deepspeed.__version__}"
        except ImportError:  # pragma: no cover
            ds = "DeepSpeed"
        return (
            f"{ds}'s kernel injection does not support transformers {transformers.__version__} (its injected "
            "layers return tuples and keep their own KV cache; transformers 5 expects neither)"
        )
    return None
