"""Stub denoisers with hand-built logits, shared by the diffusion tests."""

from __future__ import annotations

import torch


class StubDenoiser:
    """Fixed per-position logits over the answer span (independent of the canvas); counts calls.

    ``answer_logits`` (G, V) is broadcast to every row; prompt positions get zeros.
    """

    def __init__(self, answer_logits: torch.Tensor) -> None:
        self.answer_logits = answer_logits
        self.calls = 0
        self.inputs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.inputs.append(input_ids.clone())
        B, T = input_ids.shape
        G, V = self.answer_logits.shape
        out = torch.zeros(B, T, V)
        out[:, T - G:] = self.answer_logits
        return out


class FlawedParityOracle:
    """Exact parity-chain denoiser with an injected, schedule-dependent flaw (a plumbing fixture).

    Reads the canvas like a model would: a chain token whose left neighbour is decoded is computed from
    that neighbour (errors propagate) with logit 5; a chain token whose left neighbour is still masked is
    a blind guess with logit ``3 - 0.01 j``, wrong exactly when ``crc32(problem, j, mask pattern) %
    flaw_mod == 0``. The mask pattern differs between block schedules, so schedules fail on different
    problems. ``####`` and EOS positions are certain (logit 6). Not evidence about real models.
    """

    def __init__(self, prompt_len: int = 14, flaw_mod: int = 6) -> None:
        from outlierkit.diffusion import tiny

        self.t = tiny
        self.P = prompt_len
        self.flaw_mod = flaw_mod

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        import zlib

        t = self.t
        zero, hash_, eq = t.encode("0")[0], t.encode("#")[0], t.encode("=")[0]
        B, T = ids.shape
        out = torch.zeros(B, T, len(t.TOKENS))
        for r in range(B):
            row = ids[r].tolist()
            bits = [v - zero for v in row[1:row.index(eq)]]
            k, ans = len(bits), row[self.P:]
            pattern = bytes(int(a == t.MASK) for a in ans)

            def blind(j: int, truth: int, bits: list[int] = bits, pattern: bytes = pattern) -> tuple[int, float]:
                key = bytes(bits) + bytes([j]) + pattern
                return truth ^ int(zlib.crc32(key) % self.flaw_mod == 0), 3.0 - 0.01 * j

            for j, a in enumerate(ans):
                if a != t.MASK:
                    out[r, self.P + j, a] = 10.0
                    continue
                if j < k:
                    left = 0 if j == 0 else ans[j - 1]
                    if j == 0 or left != t.MASK:
                        val, conf = (left - zero if j else 0) ^ bits[j], 5.0
                    else:
                        val, conf = blind(j, sum(bits[:j + 1]) % 2)
                    out[r, self.P + j, zero + val] = conf
                elif j < k + 4:
                    out[r, self.P + j, hash_] = 6.0
                elif j == k + 4:
                    if ans[k - 1] != t.MASK:
                        val, conf = ans[k - 1] - zero, 5.0
                    else:
                        val, conf = blind(j, sum(bits) % 2)
                    out[r, self.P + j, zero + val] = conf
                else:
                    out[r, self.P + j, t.EOS] = 6.0
        return out
