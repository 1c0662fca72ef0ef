"""The server command line the controller gives a revision's replicas."""

from __future__ import annotations

from typing import Any

from converge.runtime.base import ServerKind
from converge.serving.__main__ import build_parser
from converge.workers.revision import server_args


def spec(server: ServerKind, *, args: list[str] | None = None, **resources: Any) -> dict[str, Any]:
    return {"server": server, "args": args or [], "resources": {"cpu": 2.0, "gpus": 0, **resources}}


def test_llama_cpp_runs_the_threads_of_its_cpu_grant() -> None:
    assert server_args(spec(ServerKind.LLAMA_CPP)) == ("--n-threads", "2")
    assert server_args(spec(ServerKind.LLAMA_CPP, args=["--n-threads", "1"])) == ("--n-threads", "1")


def test_llama_cpp_offloads_every_layer_only_when_the_deployment_has_gpus() -> None:
    for gpu in ({"gpus": 1}, {"mig_profile": "1g.10gb"}):
        args = server_args(spec(ServerKind.LLAMA_CPP, **gpu))
        assert args[args.index("--n-gpu-layers") + 1] == "-1"
    partial = server_args(spec(ServerKind.LLAMA_CPP, args=["--n-gpu-layers", "12"], gpus=1))
    assert partial.count("--n-gpu-layers") == 1 and "12" in partial
    assert server_args(spec(ServerKind.EMBEDDINGS, gpus=1)) == ()


def test_the_replica_command_line_accepts_what_the_controller_adds() -> None:
    argv = ["llama-cpp", "--model-path", "m.gguf", "--model-name", "m", "--port", "9000"]
    parsed = build_parser().parse_args([*argv, *server_args(spec(ServerKind.LLAMA_CPP, gpus=1))])
    assert (parsed.n_threads, parsed.n_gpu_layers) == (2, -1)
    assert build_parser().parse_args(argv).n_gpu_layers == 0


def test_vllm_splits_the_model_over_the_replicas_gpus() -> None:
    assert server_args(spec(ServerKind.VLLM, gpus=1)) == ()
    assert server_args(spec(ServerKind.VLLM, gpus=4)) == ("--tensor-parallel-size", "4")
    own = server_args(spec(ServerKind.VLLM, args=["--tensor-parallel-size", "2"], gpus=4))
    assert own == ("--tensor-parallel-size", "2")
