"""One process of `test_pipeline.py::test_pipeline_across_processes`: joins a 2-process JAX cluster on the CPU
(2 devices each, collectives over gloo), loads each checkpoint at pp=4 — two stages on each process — and writes
the logits and greedy tokens it reads on its own host.

    python tests/multihost_worker.py PROCESS_ID PORT OUT_FILE CHECKPOINT_DIR [CHECKPOINT_DIR ...]
"""

import json
import os
import sys


def main() -> None:
    pid, port, out, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    from hf_fixtures import xla_flags

    os.environ["XLA_FLAGS"] = xla_flags(2)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np

    import gemma4_jax

    with open(os.path.join(os.path.dirname(out), "inputs.json")) as f:
        inputs = json.load(f)
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    results = {}
    for i, path in enumerate(paths):
        model = gemma4_jax.load(path, pp=4, progress=False)
        results[f"logits{i}"] = model.logits(np.asarray(inputs["ids"]))
        results[f"tokens{i}"] = np.asarray(model.generate(inputs["prompts"], max_new_tokens=inputs["new_tokens"],
                                                          stop_tokens=()))
        del model
    np.savez(out + ".tmp.npz", **results)
    os.replace(out + ".tmp.npz", out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
