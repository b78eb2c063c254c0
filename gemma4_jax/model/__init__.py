"""The Gemma 4 model: the text decoder (`text`: its math as functions of arrays, its NNX modules, the layer
loop), and the vision and audio towers (`vision`, `audio`). Depends only on `gemma4_jax.config` and the kernels."""
