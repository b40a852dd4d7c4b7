"""Greedy parity with transformers on real architectures, through a real worker.

    tailguard bench parity --reference-python PY [--architectures llama,gemma] [--step-tokens N] [--json]

PY is a Python with transformers, optimum-onnx and torch (the project needs none of them):

    python3 -m venv /opt/parity && /opt/parity/bin/pip install torch \\
        'transformers<4.58' optimum-onnx onnxruntime

It builds tiny random-weight models of each architecture, exports them with Optimum, and
records transformers' greedy continuations (`parity_reference.py`). Then a worker serves
each export and the same prompts are sent over HTTP alone, all at once (one batch) and
staggered (each joining a batch already decoding). Every continuation must equal the
reference token for token, its end-of-sequence token included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.bench.common import REPO
from tests.dataplane.inference.procs import WorkerProcess, worker_config

KEY = "tg-parity"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tailguard bench parity", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--reference-python",
        required=True,
        help="a Python with transformers, optimum-onnx and torch",
    )
    parser.add_argument("--architectures", default=None, help="comma-separated; default all")
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=None,
        help="the worker's max_tokens_per_step: small values split prompts into chunks",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def references(python: str, out: Path, architectures: str | None) -> dict[str, Any]:
    argv = [python, str(REPO / "tests" / "bench" / "parity_reference.py"), str(out)]
    if architectures:
        argv += ["--architectures", architectures]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads((out / "references.json").read_text())
    return result


def _post(base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{base_url}{path}",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "synthetic", "temperature": 0, **body},
        timeout=120,
    )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def complete(
    base_url: str, prompt: list[int] | str, max_tokens: int, vocab: dict[str, int]
) -> tuple[int, list[int]]:
    """The worker's prompt token count and greedy continuation (token ids)."""
    reply = _post(
        base_url, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "logprobs": 0}
    )
    tokens = reply["choices"][0]["logprobs"]["tokens"]
    return reply["usage"]["prompt_tokens"], [vocab[token] for token in tokens]


def chat(
    base_url: str, messages: list[dict[str, str]], max_tokens: int, vocab: dict[str, int]
) -> tuple[int, list[int]]:
    """The same for a chat, rendered by the worker with the model's template."""
    reply = _post(
        base_url,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": max_tokens, "logprobs": True},
    )
    content = reply["choices"][0]["logprobs"]["content"]
    return reply["usage"]["prompt_tokens"], [vocab[item["token"]] for item in content]


def check(
    model_dir: Path, work: Path, ref: dict[str, Any], step_tokens: int | None
) -> dict[str, int]:
    """How many token prompts match the reference alone, in one batch and staggered; how
    many text prompts and chats match (same prompt length, same tokens)."""
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    prompts, outputs = ref["prompts"], ref["outputs"]
    max_tokens = max(len(o) for o in outputs)
    batching = {"max_tokens_per_step": step_tokens} if step_tokens else {}
    config = worker_config(model_dir, work / "cache", {"parity": KEY}, batching=batching)
    with WorkerProcess(config, work / "worker") as worker:

        def one(i: int, delay: float = 0.0) -> list[int]:
            time.sleep(delay)
            return complete(worker.base_url, prompts[i], max_tokens, vocab)[1]

        alone = [one(i) for i in range(len(prompts))]
        with ThreadPoolExecutor(len(prompts)) as pool:
            batched = list(pool.map(one, range(len(prompts))))
            delays = [0.05 * i for i in range(len(prompts))]
            staggered = list(pool.map(one, range(len(prompts)), delays))
        text = [
            complete(worker.base_url, t["prompt"], max_tokens, vocab)
            == (len(t["ids"]), t["output"])
            for t in ref["text"]
        ]
        chats = [
            chat(worker.base_url, c["messages"], max_tokens, vocab) == (len(c["ids"]), c["output"])
            for c in ref["chat"]
        ]
    matched = {
        name: sum(got == want for got, want in zip(runs, outputs, strict=True))
        for name, runs in (("alone", alone), ("batched", batched), ("staggered", staggered))
    }
    return {**matched, "text": sum(text), "chat": sum(chats)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tailguard-parity-") as tmp:
        work = Path(tmp)
        print("exporting the reference models...", file=sys.stderr)
        for architecture, ref in references(
            args.reference_python, work, args.architectures
        ).items():
            if "error" in ref:
                rows[architecture] = {"error": ref["error"]}
                continue
            matched = check(
                Path(ref["model_dir"]), work / f"{architecture}-run", ref, args.step_tokens
            )
            rows[architecture] = {
                "position_ids": ref["position_ids"],
                "prompts": len(ref["prompts"]),
                "texts": len(ref["text"]),
                "chats": len(ref["chat"]),
                **matched,
            }
    if args.json:
        print(json.dumps(rows))
    else:
        print(
            f"{'architecture':<12} {'position_ids':>12} {'alone':>7} {'batched':>8} "
            f"{'staggered':>10} {'text':>6} {'chat':>6}"
        )
        for name, row in rows.items():
            if "error" in row:
                print(f"{name:<12} export failed: {row['error'][:80]}")
                continue
            n = row["prompts"]
            print(
                f"{name:<12} {str(row['position_ids']):>12} {row['alone']:>5}/{n} "
                f"{row['batched']:>6}/{n} {row['staggered']:>8}/{n} "
                f"{row['text']:>4}/{row['texts']} {row['chat']:>4}/{row['chats']}"
            )
    perfect = all(
        "error" not in r
        and r["alone"] == r["batched"] == r["staggered"] == r["prompts"]
        and (r["text"], r["chat"]) == (r["texts"], r["chats"])
        for r in rows.values()
    )
    return 0 if perfect else 1


if __name__ == "__main__":
    raise SystemExit(main())
