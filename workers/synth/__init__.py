"""Synthetic data fabric: seeded, versioned generators and the datasets they write.

Importing this package loads numpy but never torch (the torch `Dataset` lives in
`workers.synth.dataset`, imported explicitly by training code).
"""

from workers.synth.base import (
    GENERATORS,
    Generator,
    SynthError,
    SynthesisRequest,
    UnknownGeneratorError,
    generate_shard,
    generators,
    get_generator,
    load_arrays,
    merge_manifest,
    read_shard,
    regenerate,
    shard_counts,
    shard_rng,
    synthesize,
    validate_params,
)

__all__ = [
    "GENERATORS",
    "Generator",
    "SynthError",
    "SynthesisRequest",
    "UnknownGeneratorError",
    "generate_shard",
    "generators",
    "get_generator",
    "load_arrays",
    "merge_manifest",
    "read_shard",
    "regenerate",
    "shard_counts",
    "shard_rng",
    "synthesize",
    "validate_params",
]
