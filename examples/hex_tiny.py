"""HEX on the bundled tiny masked-diffusion model: every schedule's answer for a few prompts, then the vote.

Run: python examples/hex_tiny.py
"""

from __future__ import annotations

import torch

from outlierkit.diffusion.hex import HexConfig, hex_generate
from outlierkit.diffusion.tiny import TINY_TOKENS, decode, load_tiny

torch.set_num_threads(1)
model, task, meta = load_tiny()  # trained with: meta["command"]
problems = task.heldout(4, seed=5)
config = HexConfig(schedules=task.default_schedules, seeds_per_block=3, temperature=0.9,
                   gen_length=task.gen_length, steps=task.gen_length // 2, extractor="after_hash")
result = hex_generate(model, [list(p.prompt_ids) for p in problems], TINY_TOKENS, config, decode)
for i, p in enumerate(problems):
    print(f"{p.text}  gold {p.answer}")
    for path in result.paths_of(i):
        print(f"   {path.schedule:>4} seed {path.seed_index}: {path.text:<20} -> {path.answer}")
    vote = result.votes[i]
    print(f"   vote: {vote.answer} {vote.counts}{' (tie -> smallest block)' if vote.tie else ''}")
