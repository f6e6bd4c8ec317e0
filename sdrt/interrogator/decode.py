"""Caption decoding over any decoder step: greedy search and beam search with the semantics of
transformers' ``generate`` (``do_sample=False``; length penalty 1, ``early_stopping=False``, a
minimum length that forbids the end token before it). The torch and ONNX Runtime decoders
share it; tests check it against ``BlipForConditionalGeneration.generate``.

``step(ids)`` takes the running sequences (K, T) int64 and returns the next token's logits
(K, V) float32 for each.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Step = Callable[[np.ndarray], np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (ties: lower index first, as torch.topk on a CPU)."""
    order = np.argsort(-x, kind="stable")
    return order[:k]


def greedy(step: Step, prompt: list[int], eos: int, min_length: int, max_length: int) -> list[int]:
    ids = list(prompt)
    while len(ids) < max_length:
        logits = step(np.asarray([ids], dtype=np.int64))[0].astype(np.float32)
        if len(ids) < min_length:
            logits[eos] = -np.inf
        token = int(np.argmax(logits))
        ids.append(token)
        if token == eos:
            break
    return ids


def beam_search(step: Step, prompt: list[int], eos: int, pad: int, num_beams: int, min_length: int,
                max_length: int, length_penalty: float = 1.0) -> list[int]:
    """The best sequence of transformers' vectorised beam search for one input."""
    k, keep, t0 = num_beams, 2 * num_beams, len(prompt)
    running = np.full((k, max_length), pad, dtype=np.int64)
    running[:, :t0] = prompt
    finished_seqs = running.copy()
    run_scores = np.zeros(k, np.float32)
    run_scores[1:] = -1e9
    fin_scores = np.full(k, -1e9, np.float32)
    finished = np.zeros(k, bool)
    improvable = True
    cur = t0
    with np.errstate(invalid="ignore", over="ignore"):
        while True:
            logp = _log_softmax(step(running[:, :cur]))
            if cur < min_length:
                logp[:, eos] = -np.inf
            vocab = logp.shape[1]
            acc = (logp + run_scores[:, None]).reshape(-1)
            top = _topk(acc, keep)
            top_lp = acc[top].astype(np.float32)
            beams, tokens = top // vocab, top % vocab
            cand = running[beams].copy()
            cand[:, cur] = tokens
            hits = (tokens == eos) | (cur + 1 >= max_length)
            # the beams that go on: the best K candidates that did not stop
            live = top_lp + hits.astype(np.float32) * -1e9
            nxt = _topk(live, k)
            running, run_scores = cand[nxt], live[nxt]
            # the finished hypotheses: among the first K candidates, those that stopped
            done_now = hits & (np.arange(keep) < k)
            scores = top_lp / float((cur + 1 - t0) ** length_penalty)
            scores = scores + (0.0 if improvable else -1e9) + (~done_now).astype(np.float32) * -1e9
            merged_scores = np.concatenate([fin_scores, scores])
            merged = np.concatenate([finished_seqs, cand])
            merged_done = np.concatenate([finished, done_now])
            best = _topk(merged_scores, k)
            finished_seqs, fin_scores, finished = merged[best], merged_scores[best], merged_done[best]
            cur += 1
            best_possible = run_scores[0] / float((cur - t0) ** length_penalty)
            worst = np.where(finished, fin_scores.min(), -1e9)
            improvable = improvable and bool(np.any(best_possible > worst))
            if not improvable or bool(np.all(hits)) or cur >= max_length:
                break
    seq = finished_seqs[0]
    return [int(x) for x in seq[:cur]]
