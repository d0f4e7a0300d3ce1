"""Profile the bundled pretrained MiniLM from Python and print its three largest activations."""

from __future__ import annotations

from outlierkit.llm.corpus import build_corpus, load_documents
from outlierkit.llm.models import load_model
from outlierkit.llm.profile import ProfileOptions, profile_model

lm = load_model("minilm")
corpus = build_corpus(lm.tokenizer, load_documents(None), samples=24, seq_len=128, seed=0)
profile = profile_model(lm.model, lm.map, corpus, ProfileOptions(level="default"))
name, value, loc = profile.global_max()
print(f"global max {value:.1f} at {name}: sample {loc.sample}, position {loc.pos}, channel {loc.channel}, "
      f"token {lm.tokenizer.convert_ids_to_tokens(loc.token)!r}")
for site in sorted(profile.sites, key=lambda s: -profile.stats[s.name].absmax)[:3]:
    st = profile.stats[site.name]
    print(f"{site.name:<20} max|x| {st.absmax:8.2f}  kurtosis {st.kurtosis:8.1f}  max/median {st.spike_ratio:8.0f}")
