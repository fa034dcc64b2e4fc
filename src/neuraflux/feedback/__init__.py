"""Where a policy's feedback comes from, at run time: rollouts sampled from it (`rollout`), the rewards that score
them (`rewards`: the world's judges, a reward model, a composite of several), the constitution and the
critique/revision and AI-feedback data built with it (`constitution`, `constitutional_data`), and measurement of
a policy on held-out prompts (`measure`).

The maths these feed (losses, advantages, KL, reward combination) is in `neuraflux.alignment`.
"""
