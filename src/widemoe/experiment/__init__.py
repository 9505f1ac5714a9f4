"""`widemoe experiment` (issue 14): seeded grids of `widemoe train` runs, judged with statistics.

`suite` reads suite files (TOML: arms, comparisons with decision rules fixed before running, the
interleaved run order; the shipped `suites/seed-claims.toml`); `runner` trains every run of a suite,
interleaved seed by seed and resumable, and `metrics` says what each run records; `stats` holds the
statistics (pooled noise, paired and Welch differences with t-intervals, Holm, verdict rules), `analysis`
applies them to a suite's records, and `report` + `figures` write its page. `probes` are the
evaluation-only tests of a checkpoint: shared-expert knockout and masking each token's top experts.
"""
