"""Pipeline parallelism: the split of the layers into stages, the one placement rule and byte counter
(`stages`), the pp runtime under `jax.shard_map` (`pipeline`), and joining several processes (`cluster`)."""
