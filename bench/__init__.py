"""Front-end overhead benchmark: our gRPC worker against vLLM's AsyncLLM in-process.

`python -m bench` (what `make bench` runs) starts every target's engine once,
then runs each workload on each target in turn, interleaved (A, B, A, B, ...)
for `--repeats` rounds, never two targets at once:

* A  ``inproc``   vLLM's `AsyncLLM` driven directly in its own process
                  (`bench.inproc`): the limit for any front end.
* B  ``worker``   our worker (`python -m backend`) over a real gRPC channel,
                  from a grpc.aio client in another process (`bench.grpc_client`).
* B+ ``worker+parsers`` the same worker loaded with hermes + qwen3 parsers, for
                  the chat workload (parsers on vs off).
* C  ``openai``   vLLM's OpenAI server, streaming /v1/completions (`--with-openai`).

Results: a table on stdout, raw data in `bench/results/<timestamp>.json`;
`bench/results/README.md` explains the fields and the goals.
"""
