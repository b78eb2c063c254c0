"""Running the model token by token at pp = 1: the KV cache and its attenders (`cache`), prefill, the compiled
decode loop and sampling (`loop`), and the checks of sampling options (`options`)."""
