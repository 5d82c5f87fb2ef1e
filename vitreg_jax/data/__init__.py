"""Input pipelines on grain (no TensorFlow).

sources     random-access sources: tfds ArrayRecord, image folders, caption lists, embedded
embedded    the procedurally generated shapes dataset (default for smoke runs and tests)
decode      robust image decoding; undecodable files skipped and counted
transforms  DINOv2 multi-crop, CLIP and evaluation transforms
masking     iBOT block masks, made per batch in the pipeline
tokenizer   CLIP BPE tokenizer (open_clip ids, no torch)
pipeline    per-process pipelines, resumable iterators, global jax.Arrays (the loop's API)

Import submodules directly; this package imports nothing so grain worker
processes stay light.
"""
