"""IndexTTS-2.5: the IndexTTS2 family's newer version (tiktoken text in five languages, CAMPPlus speaker row,
language embedding, 25 Hz codec decoder, no GPT latent). Everything else is 2.0's and is reused from
`engine_ref.indextts2` (emotion path, DiT/CFM, BigVGAN v2, w2v-BERT, CAMPPlus). Facts: indextts2-facts.md §9."""
