#!/usr/bin/env python3
"""Stream a generation from a Triton server hosting an rwkvq-onnx model repository (gRPC, one sequence id).

    rwkvq-onnx triton-repo q.onnx -o models/ && tritonserver --model-repository models/
    python tools/triton_client.py --url localhost:8001 --model rwkv --prompt "The Eiffel tower is in" --tokens 64

Every request carries one token and the sequence id; the server keeps the
model's state (implicit state, zero at sequence start) and batches
concurrent sequences when the model has `max_batch_size > 0` (the request
then carries a batch dimension of 1). Needs `pip install tritonclient[grpc]`
(the `deploy` extra); the tokenizer is chosen by vocab size as in
`rwkvq-onnx generate` (or --tokenizer).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint (default: localhost:8001)")
    ap.add_argument("--model", default="rwkv", help="model name in the repository (default: rwkv)")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate (default: 64)")
    ap.add_argument("--sequence-id", type=int, default=1,
                    help="sequence id; concurrent clients need distinct ids (default: 1)")
    ap.add_argument("--tokenizer", default="auto", help="tokenizer, as for rwkvq-onnx generate (default: auto)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = ap.parse_args()
    import tritonclient.grpc as grpcclient

    from rwkvq_onnx.generate import sample_token
    from rwkvq_onnx.tokenizers import get_tokenizer

    client = grpcclient.InferenceServerClient(args.url)
    meta = client.get_model_metadata(args.model)
    vocab = int(next(o for o in meta.outputs if o.name == "logits").shape[-1])
    batched = client.get_model_config(args.model).config.max_batch_size > 0
    token_shape = [1, 1] if batched else [1]  # [batch, 1] when Triton batches sequences
    tokenizer = get_tokenizer(args.tokenizer, vocab)
    prompt = ([tokenizer.bos] if tokenizer.bos is not None else []) + tokenizer.encode(args.prompt)
    rng = np.random.default_rng(args.seed)

    def step(token: int, start: bool, end: bool) -> np.ndarray:
        inp = grpcclient.InferInput("token", token_shape, "INT64")
        inp.set_data_from_numpy(np.full(token_shape, token, np.int64))
        res = client.infer(args.model, [inp], sequence_id=args.sequence_id, sequence_start=start,
                           sequence_end=end, outputs=[grpcclient.InferRequestedOutput("logits")])
        return res.as_numpy("logits").reshape(-1)

    logits = None
    for i, tok in enumerate(prompt):
        logits = step(tok, start=(i == 0), end=False)
    sys.stdout.write(args.prompt)
    for i in range(args.tokens):
        tok = sample_token(logits, rng, args.temperature, args.top_p)
        sys.stdout.write(tokenizer.decode([tok]))
        sys.stdout.flush()
        logits = step(tok, start=False, end=(i == args.tokens - 1))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
