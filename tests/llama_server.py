"""Serve a GGUF with llama.cpp's own OpenAI-compatible server, from the prebuilt `xllamacpp`
wheel (a portable AVX2 build: no compiler, nothing tuned to the CPU it was installed on).

    python tests/llama_server.py MODEL.gguf PORT [ALIAS]

Serves /v1/models and /v1/chat/completions on 127.0.0.1:PORT until SIGTERM or SIGINT. Chosen
over llama-cpp-python, which pip compiles with -march=native on each machine (docs/llm.md).
"""

from __future__ import annotations

import signal
import sys

import xllamacpp as xlc


def main(model: str, port: int, alias: str = "smollm2") -> None:
    params = xlc.CommonParams()
    params.model.path = model
    params.model_alias = {alias}
    params.n_ctx = 4096
    params.hostnames = ["127.0.0.1"]
    params.port = port
    for cpu in (params.cpuparams, params.cpuparams_batch):
        cpu.n_threads = 2
        cpu.poll = 0  # sleep between requests instead of spinning on the cores
    server = xlc.Server(params)  # serves in its own threads
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del server


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
